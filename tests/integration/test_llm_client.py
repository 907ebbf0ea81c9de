"""The OpenAI-compatible client against the real llama.cpp server on Gemma 3 270M."""

from __future__ import annotations

import pytest

from appliance.lab.model import MODEL_ALIAS
from runtime.common.llm_client import LlmClient, LlmConfig, LlmError, LlmUnavailable
from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config(llm_endpoint: str) -> LlmConfig:
    return LlmConfig(base_url=llm_endpoint, model=MODEL_ALIAS, prompt_style="completion", timeout_s=60)


def test_models_and_completion_with_logprobs(config: LlmConfig) -> None:
    with LlmClient(config) as client:
        assert MODEL_ALIAS in client.models()
        result = client.complete("One, two, three,", max_tokens=3, temperature=0.0, logprobs=1)
    assert result.text.strip()
    assert result.finish_reason in ("length", "stop")
    assert result.prompt_tokens and result.prompt_tokens > 0
    assert result.token_logprobs is not None and len(result.token_logprobs) == result.completion_tokens
    assert result.mean_logprob is not None and result.mean_logprob <= 0


def test_stop_sequences_and_deterministic_greedy_decoding(config: LlmConfig) -> None:
    with LlmClient(config) as client:
        a = client.complete("Question: What is 2 + 2?\nAnswer:", max_tokens=24, temperature=0.0, stop=["\n"])
        b = client.complete("Question: What is 2 + 2?\nAnswer:", max_tokens=24, temperature=0.0, stop=["\n"])
    assert "\n" not in a.text
    assert a.text == b.text


def test_streaming_yields_the_same_text_as_a_plain_call(config: LlmConfig) -> None:
    with LlmClient(config) as client:
        whole = client.complete("The colours of the rainbow are", max_tokens=12, temperature=0.0)
        deltas = list(client.stream_complete("The colours of the rainbow are", max_tokens=12, temperature=0.0))
        via_style = "".join(client.stream_generate("The colours of the rainbow are", max_tokens=12, temperature=0.0))
    assert len(deltas) > 1
    assert "".join(deltas) == whole.text == via_style


def test_chat_endpoint_answers(config: LlmConfig) -> None:
    chat_config = config.model_copy(update={"prompt_style": "chat"})
    with LlmClient(chat_config) as client:
        result = client.generate("Name a colour.", system="Answer with one word.", max_tokens=8, temperature=0.0)
        streamed = list(client.stream_chat([{"role": "user", "content": "Name a colour."}], max_tokens=8))
    assert isinstance(result.text, str)
    assert result.finish_reason in ("length", "stop")
    assert all(isinstance(d, str) and d for d in streamed)


def test_errors_carry_the_status_and_the_servers_message(config: LlmConfig) -> None:
    with LlmClient(config) as client, pytest.raises(LlmError) as too_long:
        client.complete("word " * 5000, max_tokens=4)
    assert too_long.value.status == 400
    assert "context" in too_long.value.message

    with LlmClient(config.model_copy(update={"base_url": config.base_url + "/nowhere"})) as client:
        with pytest.raises(LlmError) as missing:
            client.complete("x", max_tokens=1)
        assert missing.value.status == 404
        with pytest.raises(LlmError):
            list(client.stream_complete("x", max_tokens=1))

    closed = config.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1", "connect_timeout_s": 2})
    with LlmClient(closed) as client:
        with pytest.raises(LlmUnavailable) as down:
            client.complete("x")
        assert down.value.status is None
        with pytest.raises(LlmUnavailable):
            list(client.stream_complete("x"))


def test_the_api_key_is_sent_but_never_shown(config: LlmConfig) -> None:
    keyed = LlmConfig.model_validate({**config.model_dump(), "api_key": "sk-very-secret"})
    client = LlmClient(keyed)
    try:
        assert "sk-very-secret" not in repr(keyed)
        assert "sk-very-secret" not in repr(client)
        assert client.complete("Hi", max_tokens=1).text is not None  # llama.cpp without --api_key ignores it
    finally:
        client.close()
