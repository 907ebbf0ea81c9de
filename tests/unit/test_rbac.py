"""RBAC: deny by default, department scopes that cannot be widened, policy errors with their lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.common.identity import Identity, Kind
from runtime.common.rbac import ACTIONS, Decision, Policy, decide, load_policy
from runtime.common.yamldoc import FileIssue, InvalidFile

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "rbac.yaml"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(EXAMPLE)


def who(subject: str, kind: Kind = "user", *departments: str) -> Identity:
    return Identity(subject=subject, kind=kind, departments=tuple(departments), auth="mtls")


ENGINEER = who("eve", "user", "engineering")
SALES_LAPTOP = who("laptop-0042", "device", "sales")
GATEWAY = who("gateway.lab.membria.internal", "service")
CORE = who("core-1.lab.membria.internal", "service")
AUDITOR = who("dana", "user", "hr")
ADMIN = who("ops-admin", "user")


def denied(decision: Decision) -> Decision:
    assert not decision.allowed, decision
    assert decision.allowed_departments == ()
    return decision


# --- the example policy: negative cases ---------------------------------------------------------------------


def test_example_loads(policy: Policy) -> None:
    assert policy.departments == ["engineering", "sales", "hr"]
    assert {r.name for r in policy.roles} >= {"employee", "auditor", "admin", "engineering-editor"}


@pytest.mark.parametrize("action", ACTIONS)
def test_unbound_identity_is_denied_everything(policy: Policy, action: str) -> None:
    stranger = who("mallory", "service", "engineering")  # a site certificate, but no binding names it
    decision = denied(decide(policy, stranger, action))
    assert decision.role is None
    assert "no role is bound to service:mallory" in decision.reason


def test_engineer_cannot_search_sales(policy: Policy) -> None:
    decision = denied(decide(policy, ENGINEER, "search", ["sales"]))
    assert "'sales' is outside user:eve's scope" in decision.reason


def test_engineer_cannot_search_own_and_sales_together(policy: Policy) -> None:
    denied(decide(policy, ENGINEER, "search", ["engineering", "sales"]))


def test_engineer_cannot_read_hr_documents(policy: Policy) -> None:
    denied(decide(policy, ENGINEER, "read_documents", ["hr"]))


def test_sales_device_cannot_sync_engineering(policy: Policy) -> None:
    denied(decide(policy, SALES_LAPTOP, "sync", ["engineering"]))


def test_user_without_write_role_cannot_upload(policy: Policy) -> None:
    decision = denied(decide(policy, ENGINEER, "write_documents", ["engineering"]))
    assert decision.role is None
    assert "do not allow 'write_documents'" in decision.reason


def test_editor_of_one_department_cannot_upload_to_another(policy: Policy) -> None:
    alice = who("alice", "user", "engineering")
    denied(decide(policy, alice, "write_documents", ["sales"]))


def test_device_named_like_an_editor_gets_no_editor_role(policy: Policy) -> None:
    # Bindings by subject name the kind too: a laptop with CN=alice is not alice.
    denied(decide(policy, who("alice", "device", "engineering"), "write_documents", ["engineering"]))


def test_auditor_cannot_chat(policy: Policy) -> None:
    # dana is also an hr employee (kind: user binding), so test a department she has only as auditor.
    denied(decide(policy, AUDITOR, "chat", ["sales"]))
    auditor_only = load_policy(EXAMPLE).model_copy(
        update={"bindings": [b for b in policy.bindings if b.role == "auditor"]}
    )
    denied(decide(auditor_only, AUDITOR, "chat"))
    denied(decide(auditor_only, AUDITOR, "search", ["hr"]))


@pytest.mark.parametrize("requested", [["*"], ["engineering", "*"], ["all"], ["Engineering"]])
def test_scope_cannot_be_widened_by_asking(policy: Policy, requested: list[str]) -> None:
    decision = denied(decide(policy, ENGINEER, "search", requested))
    assert "is not a department of this site" in decision.reason


def test_admin_cannot_ask_for_star_either(policy: Policy) -> None:
    denied(decide(policy, ADMIN, "search", ["*"]))


def test_caller_without_department_gets_nothing_for_own(policy: Policy) -> None:
    decision = denied(decide(policy, who("eve", "user"), "search"))
    assert "reaches no department" in decision.reason


def test_unknown_ou_reaches_nothing(policy: Policy) -> None:
    # A certificate whose OU the policy does not list must not open a collection of that name.
    denied(decide(policy, who("eve", "user", "finance"), "search"))
    denied(decide(policy, who("eve", "user", "finance"), "search", ["finance"]))


def test_gateway_is_limited_to_what_it_forwards(policy: Policy) -> None:
    for action in ("escalate", "audit_read", "admin"):
        denied(decide(policy, GATEWAY, action))


def test_core_service_may_only_embed(policy: Policy) -> None:
    denied(decide(policy, CORE, "search", ["engineering"]))
    denied(decide(policy, CORE, "chat"))
    assert decide(policy, CORE, "embeddings").allowed


def test_gateway_certificate_of_another_kind_is_not_the_gateway(policy: Policy) -> None:
    denied(decide(policy, who("gateway.lab.membria.internal", "device"), "search", ["sales"]))


def test_unknown_action_is_denied(policy: Policy) -> None:
    decision = denied(decide(policy, ADMIN, "delete_everything"))
    assert "unknown action" in decision.reason


# --- the example policy: positive cases ---------------------------------------------------------------------


def test_engineer_searches_own_department(policy: Policy) -> None:
    decision = decide(policy, ENGINEER, "search")
    assert decision.allowed and decision
    assert decision.role == "employee"
    assert decision.allowed_departments == ("engineering",)
    assert decide(policy, ENGINEER, "search", ["engineering"]).allowed


@pytest.mark.parametrize("action", ["chat", "search", "read_documents", "escalate", "sync"])
def test_employee_actions(policy: Policy, action: str) -> None:
    assert decide(policy, SALES_LAPTOP, action, ["sales"]).allowed_departments == ("sales",)


def test_multi_department_caller_gets_both(policy: Policy) -> None:
    both = who("frank", "user", "sales", "engineering")
    decision = decide(policy, both, "search", ["engineering", "sales"])
    assert decision.allowed
    assert decision.allowed_departments == ("engineering", "sales")  # policy order


def test_editor_uploads_to_own_department(policy: Policy) -> None:
    decision = decide(policy, who("alice", "user", "engineering"), "write_documents", ["engineering"])
    assert decision.allowed
    assert decision.role == "engineering-editor"
    assert decision.allowed_departments == ("engineering",)


def test_gateway_forwards_any_department(policy: Policy) -> None:
    decision = decide(policy, GATEWAY, "search", ["hr", "sales"])
    assert decision.allowed
    assert decision.allowed_departments == ("engineering", "sales", "hr")


def test_auditor_reads_audit(policy: Policy) -> None:
    assert decide(policy, AUDITOR, "audit_read").role == "auditor"


def test_admin_reaches_every_department(policy: Policy) -> None:
    decision = decide(policy, ADMIN, "search", ["hr"])
    assert decision.allowed
    assert decision.role == "admin"
    assert decision.allowed_departments == ("engineering", "sales", "hr")
    assert decide(policy, ADMIN, "admin").allowed


def test_roles_add_up(tmp_path: Path) -> None:
    text = """\
departments: [engineering, sales]
roles:
  - {name: employee, actions: [search], departments: own}
  - {name: sales-reader, actions: [search], departments: [sales]}
bindings:
  - {role: employee, kind: user}
  - {role: sales-reader, kind: user, departments: [engineering]}
"""
    policy = load_policy(write(tmp_path, text))
    decision = decide(policy, ENGINEER, "search", ["engineering", "sales"])
    assert decision.allowed
    assert decision.roles == ("employee", "sales-reader")
    assert decide(policy, SALES_LAPTOP, "search").allowed is False  # devices are bound to nothing here
    # The department filter of a binding: a sales user is not a sales-reader, only an employee.
    assert decide(policy, who("bob", "user", "sales"), "search", ["sales"]).role == "employee"


# --- loading: every problem with its line ------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rbac.yaml"
    path.write_text(text)
    return path


BASE = """\
departments: [engineering, sales]
roles:
  - name: employee
    actions: [chat, search]
    departments: own
  - name: admin
    admin: true
    actions: [admin]
    departments: "*"
bindings:
  - {role: employee, kind: user}
"""


def issues(tmp_path: Path, text: str) -> list[FileIssue]:
    with pytest.raises(InvalidFile) as caught:
        load_policy(write(tmp_path, text))
    assert caught.value.exit_code == 2
    return caught.value.issues


def test_base_policy_loads(tmp_path: Path) -> None:
    assert [r.name for r in load_policy(write(tmp_path, BASE)).roles] == ["employee", "admin"]


def test_unknown_action_rejected_at_load(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE.replace("[chat, search]", "[chat, serach]"))
    assert (issue.path, issue.line) == ("roles[0].actions[1]", 4)
    assert "'search'" in issue.message  # the allowed values are listed


def test_binding_to_missing_role_rejected_with_line(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE + "  - {role: superuser, kind: user}\n")
    assert (issue.path, issue.line) == ("bindings[1].role", 12)
    assert "undefined role 'superuser'" in issue.message
    assert "employee, admin" in issue.message


def test_duplicate_role_rejected(tmp_path: Path) -> None:
    text = BASE.replace("bindings:\n", "  - {name: employee, actions: [chat], departments: [sales]}\nbindings:\n")
    [issue] = issues(tmp_path, text)
    assert (issue.path, issue.line) == ("roles[2].name", 10)
    assert "defined twice" in issue.message


def test_star_on_non_admin_role_rejected(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE.replace("departments: own", 'departments: "*"'))
    assert (issue.path, issue.line) == ("roles[0].departments", 5)
    assert "only for admin roles" in issue.message and "admin: true" in issue.message


def test_admin_action_on_non_admin_role_rejected(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE.replace("[chat, search]", "[chat, admin]"))
    assert (issue.path, issue.line) == ("roles[0].actions", 4)


def test_unknown_department_in_role_rejected(tmp_path: Path) -> None:
    text = BASE.replace(
        "bindings:\n", "  - {name: reader, actions: [search], departments: [sales, finance]}\nbindings:\n"
    )
    [issue] = issues(tmp_path, text)
    assert (issue.path, issue.line) == ("roles[2].departments[1]", 10)
    assert "unknown department 'finance'" in issue.message


def test_bad_scopes_rejected_with_one_message(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE.replace("departments: own", "departments: everyone"))
    assert issue.path == "roles[0].departments"
    assert "'own' or '*'" in issue.message
    [issue] = issues(tmp_path, BASE.replace("departments: own", "departments: [own]"))
    assert issue.path == "roles[0].departments[0]"
    assert "stand alone" in issue.message


def test_department_names_are_checked(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE.replace("[engineering, sales]", "[engineering, own]"))
    assert (issue.path, issue.line) == ("departments[1]", 1)
    [issue] = issues(tmp_path, BASE.replace("[engineering, sales]", "[sales, sales]"))
    assert "listed twice" in issue.message


def test_binding_needs_a_kind(tmp_path: Path) -> None:
    [issue] = issues(tmp_path, BASE.replace("{role: employee, kind: user}", "{role: employee, subject: alice}"))
    assert (issue.path, issue.line) == ("bindings[0].kind", 11)
    assert "missing required field 'kind'" in issue.message


def test_typos_and_many_problems_reported_together(tmp_path: Path) -> None:
    text = BASE.replace("    actions: [chat, search]\n", "    actions: [chat, serach]\n    scope: all\n")
    text = text.replace("{role: employee, kind: user}", "{role: employee, kind: robot}")
    found = {(i.path, i.line) for i in issues(tmp_path, text)}
    assert found == {("roles[0].actions[1]", 4), ("roles[0].scope", 5), ("bindings[0].kind", 12)}


def test_missing_policy_file(tmp_path: Path) -> None:
    [issue] = issues_of_path(tmp_path / "nope.yaml")
    assert issue.message == "no such file"


def issues_of_path(path: Path) -> list[FileIssue]:
    with pytest.raises(InvalidFile) as caught:
        load_policy(path)
    return caught.value.issues
