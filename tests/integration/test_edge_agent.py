"""The edge agent as a laptop runs it: `python -m runtime.edge`, its local API, the CLI and the chat page.

The agent here has no reachable gateway (a laptop on a plane): it answers locally, queues what it would
escalate, and keeps sensitive questions on the device. Escalation delivery and sync against a real
gateway are tested with the lab (test_lab.py) and in test_edge_outbox.py / test_gateway_sync.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.lab.model import ensure_gemma
from tests.conftest import EXAMPLES, REPO, free_port

pytestmark = pytest.mark.integration

CORPUS = EXAMPLES / "corpus" / "engineering"


def _name(cn: str, ou: str | None = None, o: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if o:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o))
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


def _device_pki(directory: Path) -> dict[str, str]:
    """A throwaway CA and device certificate: nothing here checks them (no gateway is reachable)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("laptop-7.test", ou="engineering", o="device"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"cert": directory / "device.crt", "key": directory / "device.key", "ca": directory / "ca.pem"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return {k: str(v) for k, v in paths.items()}


class Agent:
    def __init__(self, root: Path, *, unix_socket: Path | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "edge.json"
        dead_gateway = f"https://127.0.0.1:{free_port()}"  # nothing listens there: the laptop is offline
        self.config.write_text(
            json.dumps(
                {
                    "device": "laptop-7",
                    "profile": "engineering-laptop",
                    "departments": ["engineering"],
                    "data_dir": str(root / "data"),
                    "port": self.port,
                    "unix_socket": str(unix_socket) if unix_socket else None,
                    "gateways": [dead_gateway],
                    "core_model": "gemma-3-270m-q4_k_m",
                    "tls": _device_pki(root),
                    "model": {"path": str(ensure_gemma()), "context_tokens": 2048, "max_tokens": 48},
                    "routing": {"theta": 0.45, "taxonomy_file": str(EXAMPLES / "taxonomy.yaml")},
                    "sync": {"interval_seconds": 3600},
                    "escalation": {"retries": 1, "backoff_seconds": 0.2, "backoff_max_seconds": 1, "wait_seconds": 1},
                    "pinned_knowledge_chars": 800,
                }
            )
        )
        self.unix_socket = unix_socket
        self.log = root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.edge", "--config", str(self.config)], cwd=REPO, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"edge agent exited: {self.log.read_text()[-3000:]}")
            try:
                with self.client(timeout=2) as client:
                    if client.get("/healthz").status_code == 200:
                        return
            except httpx.HTTPError:
                time.sleep(0.5)
        pytest.fail(f"edge agent did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def client(self, timeout: float = 300) -> httpx.Client:
        if self.unix_socket is not None:
            transport = httpx.HTTPTransport(uds=str(self.unix_socket))
            return httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout)
        return httpx.Client(base_url=self.url, timeout=timeout)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("edge"))
    a.start()
    try:
        with a.client() as client:
            for path in sorted(CORPUS.iterdir()):
                r = client.post("/api/documents", files={"file": (path.name, path.read_bytes())})
                assert r.status_code == 200, r.text
        yield a
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.stop()


def _ask(client: httpx.Client, question: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/ask", json={"question": question, "use_cache": False, **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_documents_are_indexed_and_counted(agent: Agent) -> None:
    with agent.client() as client:
        status = client.get("/api/status").json()
    assert status["knowledge"]["documents"] == 3
    assert status["knowledge"]["chunks"] >= 3
    assert status["model"]["loaded"] is True
    assert status["pinned"] and status["pinned"]["chunks"] >= 1  # cache-augmented generation is on


def test_an_in_scope_question_is_answered_on_the_laptop_with_reasons(agent: Agent) -> None:
    with agent.client() as client:
        answer = _ask(client, "What is the alarm threshold for the bearing temperature of feed pump P-12?")
        decisions = client.get("/api/decisions").json()
    assert answer["source"] == "local"
    assert answer["answer"].strip()
    assert any(s["doc_id"] == "pump-p12-maintenance" for s in answer["sources"])
    reasons = [r["code"] for r in answer["decision"]["reasons"]]
    assert reasons, answer["decision"]
    assert 0.0 <= answer["decision"]["confidence"] <= 1.0
    # Every decision is logged with its reasons.
    assert decisions[0]["route"] == answer["decision"]["route"]
    assert [r["code"] for r in decisions[0]["reasons"]] == reasons


def test_a_cross_department_question_is_queued_and_answered_locally_while_offline(agent: Agent) -> None:
    with agent.client() as client:
        answer = _ask(client, "What discount may sales give on a quote before it needs approval?")
        assert answer["decision"]["route"] == "escalate"
        assert "cross-department" in [r["code"] for r in answer["decision"]["reasons"]]
        assert answer["source"] == "local"  # the user is not left waiting for a gateway that is not there
        escalation = answer["escalation"]
        assert escalation and escalation["status"] != "delivered"
        state = client.get(f"/api/escalations/{escalation['id']}").json()
        assert state["status"] in ("pending", "queued")
        assert client.get("/api/status").json()["outbox"]["pending"] >= 1


def test_a_sensitive_question_never_leaves_the_laptop(agent: Agent) -> None:
    with agent.client() as client:
        before = client.get("/api/status").json()["outbox"]
        answer = _ask(
            client, "Sales asked: send the quote for customer jane.doe@example.com with card 4111 1111 1111 1111"
        )
        after = client.get("/api/status").json()["outbox"]
    decision = answer["decision"]
    assert decision["route"] == "local" and decision["sensitive"] is True
    codes = [r["code"] for r in decision["reasons"]]
    assert "sensitive" in codes and "cross-department" in codes  # the override is explained, not hidden
    assert answer["escalation"] is None
    assert after == before
    assert "jane.doe@example.com" not in json.dumps(decision)  # reasons name kinds, never the matched text


def test_the_answer_cache_is_used_and_dropped_when_its_chunks_change(agent: Agent, tmp_path: Path) -> None:
    question = "How many drops per minute mean the P-12 mechanical seal must be replaced?"
    with agent.client() as client:
        first = client.post("/api/ask", json={"question": question}).json()
        second = client.post("/api/ask", json={"question": question}).json()
        assert second["source"] == "cache" and second["answer"] == first["answer"]
        changed = (CORPUS / "pump-p12-maintenance.md").read_text().replace("10 drops", "12 drops")
        r = client.post("/api/documents", files={"file": ("pump-p12-maintenance.md", changed.encode())})
        assert r.status_code == 200, r.text
        third = client.post("/api/ask", json={"question": question}).json()
    assert third["source"] != "cache"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"question": ""}, 422, "question"),
        ({"question": "hi", "temperature": 5}, 422, "temperature"),
        ({"question": "hi", "model": "gpt-5"}, 422, "gpt-5"),
        ({"question": "hi", "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_requests_get_clear_errors(agent: Agent, body: dict[str, Any], status: int, words: str) -> None:
    with agent.client() as client:
        r = client.post("/api/ask", json=body)
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_bad_documents_and_foreign_pages_are_refused(agent: Agent) -> None:
    with agent.client() as client:
        r = client.post("/api/documents", files={"file": ("tool.exe", b"MZ\x90\x00")})
        assert r.status_code == 422 and "exe" in r.json()["error"]["message"].lower()
        r = client.post("/api/documents", files={"file": ("x.md", b"hi")}, data={"department": "hr"})
        assert r.status_code == 422 and "hr" in r.json()["error"]["message"]
        # Another web site open in the laptop's browser must not drive the agent (CSRF, DNS rebinding).
        r = client.post("/api/ask", json={"question": "hi"}, headers={"origin": "https://evil.example"})
        assert r.status_code == 403
        r = client.get("/api/status", headers={"host": "evil.example"})
        assert r.status_code == 400


def test_cli_status_ask_and_sync(agent: Agent) -> None:
    env = {**os.environ, "MEMBRIA_EDGE_URL": agent.url}
    cli = [sys.executable, "-m", "appliance", "edge"]
    status = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["device"] == "laptop-7"
    ask = subprocess.run(
        [*cli, "ask", "Who may operate valve VX-55?", "--no-cache"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ask.returncode == 0, ask.stderr
    assert "source: local" in ask.stdout
    sync = subprocess.run([*cli, "sync"], env=env, capture_output=True, text=True, timeout=120)
    assert sync.returncode == 1  # no gateway: a failed check, said in one line
    assert "gateway" in sync.stderr and "Traceback" not in sync.stderr
    bad = subprocess.run([*cli, "ask", "hi", "--url", "http://127.0.0.1:1"], capture_output=True, text=True)
    assert bad.returncode == 3 and "cannot reach the edge agent" in bad.stderr


def test_chat_page_in_headless_chromium(agent: Agent, tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec_
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    try:
        driver.get(agent.url)
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: d.find_element(By.ID, "model").find_elements(By.TAG_NAME, "option"))
        assert driver.find_element(By.ID, "model").get_attribute("value") == "gemma-3-270m-q4_k_m"
        for field in ("temperature", "top_p", "max_tokens", "presence_penalty"):
            assert driver.find_element(By.ID, field).get_attribute("value") != ""
        wait.until(lambda d: "%" in d.find_element(By.ID, "cpu-text").text)  # the CPU/RAM monitor runs
        assert "MB" in driver.find_element(By.ID, "ram-text").text

        upload = tmp_path / "p12-note.txt"
        upload.write_text("Pump P-12 coupling alignment tolerance is 0.05 mm, checked with the laser tool.")
        driver.find_element(By.ID, "file").send_keys(str(upload))
        driver.find_element(By.CSS_SELECTOR, "#upload button").click()
        wait.until(ec_.text_to_be_present_in_element((By.ID, "upload-status"), "Added"))

        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("24")
        driver.find_element(By.ID, "question").send_keys("What is the P-12 coupling alignment tolerance?")
        driver.find_element(By.ID, "send").click()
        badge = wait.until(ec_.presence_of_element_located((By.CSS_SELECTOR, "#log .msg .badge")))
        assert badge.text in ("local", "core", "cache")
        why = driver.find_element(By.CSS_SELECTOR, "#log .msg .why").text
        assert "confidence" in why  # each answer says where it came from and why
        shot = tmp_path / "chat.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        artifacts = os.environ.get("MEMBRIA_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shot.replace(Path(artifacts) / "edge-chat.png")
    finally:
        driver.quit()


def test_restart_keeps_knowledge_and_queued_escalations(agent: Agent) -> None:
    with agent.client() as client:
        before = client.get("/api/status").json()
    assert agent.stop() == 0
    agent.start()
    with agent.client() as client:
        after = client.get("/api/status").json()
    assert after["knowledge"] == before["knowledge"]
    assert after["outbox"]["pending"] == before["outbox"]["pending"] >= 1


def test_the_local_api_on_a_unix_socket_is_for_its_user_only(tmp_path: Path) -> None:
    socket = Path(tempfile.mkdtemp(prefix="edge-")) / "agent.sock"  # AF_UNIX paths are short: not under tmp_path
    a = Agent(tmp_path, unix_socket=socket)
    a.start()
    try:
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600
        status = subprocess.run(
            [sys.executable, "-m", "appliance", "edge", "status", "--socket", str(socket), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["device"] == "laptop-7"
        with pytest.raises(httpx.ConnectError):  # and nothing listens on TCP
            httpx.get(f"{a.url}/healthz", timeout=2)
    finally:
        assert a.stop() == 0
    assert not socket.exists()  # removed on a clean stop
