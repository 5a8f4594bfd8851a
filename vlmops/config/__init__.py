"""The schema of pipeline.yaml: one typed config for every step, loaded with dotted overrides.

Unknown keys and bad values are errors; all of them are reported at once, each with its key path and,
when it came from a file, the file and line.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vlmops.errors import UserInputError
from vlmops.plural import counted

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class RunConfig(Section):
    name: str = "demo"
    """Name of this pipeline; used in the MLflow run name and the run folder."""
    output_dir: str = "outputs"
    """Root folder for everything a run writes (runs, models, datasets). Relative paths resolve against
    the working directory."""
    seed: int = 0
    """Seed for data generation, shuffling, LoRA init and dropout."""


class ModelConfig(Section):
    name: str = "tiny-deepseek-vl"
    """A catalog name (`vlmops models` lists them) or, with `source: local`, any label for your own model."""
    source: Literal["modelscope", "huggingface", "local", "s3"] | None = None
    """Where the weights come from. Default: the catalog entry's default (ModelScope for the released
    models, local for the tiny ones)."""
    id: str | None = None
    """Hub id, local folder or s3:// prefix. Default: the catalog's id for the chosen source."""
    revision: str | None = None
    """Hub revision (branch, tag or commit). Default: the catalog's pinned revision."""
    cache_dir: str = "~/.cache/vlmops/models"
    """Where downloaded and converted snapshots are kept (with their manifests)."""
    compile_cache: str | None = "~/.cache/vlmops/torch-compile"
    """Where torch.compile keeps what it compiled (the fast engine's towers and decode step, `train.compile`'s layers),
    so that the next job on this machine does not compile again: ~50 s less in a 7b job's first shard on an H200. On GPU
    workers that start fresh, a persistent volume, as `cache_dir`. null: torch's default (/tmp/torchinductor_<user>,
    gone with the machine). The environment variable TORCHINDUCTOR_CACHE_DIR, where set, wins."""
    shared_compile_cache: str | None = None
    """An s3:// prefix (or a folder) where a fleet's GPU workers share what torch.compile compiled, for workers that
    each start on a fresh machine: a batch job loads it into `compile_cache` before its first shard and, after a shard
    that compiled anything new, writes it back (one file per torch version and GPU kind, under `storage`'s
    credentials; with `infer.workers` above 1 the first worker of a machine writes it, the others only load it).
    null: no sharing."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    attn: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel for the LLM and SigLIP (SAM uses SDPA, or FlexAttention with `train.sam_attention` /
    `infer.sam_attention`: flex). flash_attention_2 needs flash-attn.
    flex_attention (the LLM only; the vision towers use SDPA): skips the masked blocks of packed rows
    (train.packing) on the GPU; no backward on CPU."""
    system_prompt: str | None = None
    """System prompt of the `deepseek` chat format. null: the released default; "": no system prompt."""
    allow_pickle: bool = False
    """Load pickle weights (`pytorch_model.bin`, `.pt`): unpickling a file can run any code in it, so by default
    only safetensors load and a folder with pickle weights alone is refused. true: only for a source you trust."""


class DemoDataConfig(Section):
    num_train: int = Field(320, ge=1)
    """Training records to generate."""
    num_eval: int = Field(40, ge=1)
    """Held-out eval records (single-image questions with one short right answer)."""
    image_size: int = Field(64, ge=16)
    """Side of the generated square PNG images, in pixels."""


class DataConfig(Section):
    train: str | None = None
    """Training data: a .json (list) or .jsonl file in the `conversations` or `messages` format.
    null: generate the demo dataset."""
    eval: str | None = None
    """Held-out eval data, same formats. null: split `eval_ratio` off the training file."""
    eval_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the training records held out for eval when `eval` is null (a seeded, saved split)."""
    max_length: int = Field(2048, ge=16)
    """Longest sample in tokens, image tokens included."""
    max_length_policy: Literal["error", "drop", "truncate-text"] = "error"
    """What to do with a longer sample: stop with an error, drop it (reported), or cut the text of its last
    turns (never an image)."""
    invalid_records: Literal["error", "skip"] = "error"
    """A record that fails validation stops the run before training, with every problem listed (error), or
    is left out (skip). Either way each rejected record is written to `rejects_file` with its reason."""
    rejects_file: str | None = None
    """Where rejected records are written (jsonl: file, line, field, reason, the record's text), rewritten by
    each validation. null: `<run.output_dir>/datasets/rejects.jsonl`."""
    allowed_roots: list[str] = []
    """Folders besides each dataset file's own (and each batch-inference input file's own) where its local
    image paths may point. A path outside them (`../../etc/passwd`, an absolute path elsewhere, a symlink out)
    rejects the record. Set, part of a batch inference job's identity."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes that load and preprocess images while the GPU trains. auto: half the CPU
    cores up to 8 when there is a GPU (preprocessing in the training process starves it), 0 without one."""
    demo: DemoDataConfig = DemoDataConfig()
    """The generated demo dataset (used when `train` is null)."""


def resolve_num_workers(value: int | str) -> int:
    """`data.num_workers` as a number (see its docstring for `auto`)."""
    if value != "auto":
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"data.num_workers must be auto or a whole number >= 0, not {value!r}")
        return value
    import torch

    return min(8, (os.cpu_count() or 2) // 2) if torch.cuda.is_available() else 0


class LoraConfig(Section):
    targets: str = "qkv"
    """qkv: the LLM's q/k/v projections (the seed's default); all-linear: every LLM linear layer; ALL:
    every linear layer, vision towers and aligner included; anything else: a regex over module names."""
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""


class FreezeConfig(Section):
    """Which parts keep their weights fixed. null: the mode's default (LoRA: all frozen, only adapters train;
    full: vision tower frozen, aligner and LLM trained). With LoRA, an unfrozen part trains fully beside
    the adapters."""

    vision: bool | None = None
    """The vision tower(s): SigLIP, and SAM on the hybrid 7b."""
    aligner: bool | None = None
    """The aligner (projector) from vision features to LLM embeddings."""
    llm: bool | None = None
    """The language model, embeddings and LM head included."""


class TrainConfig(Section):
    mode: Literal["lora", "full"] = "lora"
    """lora: train adapters (peft); full: train every unfrozen weight."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(1, ge=1)
    """Samples per device per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Forward passes per optimizer step."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    lora: LoraConfig = LoraConfig()
    """LoRA settings (mode: lora)."""
    freeze: FreezeConfig = FreezeConfig()
    """Which parts to freeze."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision. auto: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: much less memory, about 30% slower. auto: on a GPU, chosen with
    the micro-batch by the memory policy (`memory_gib`): with compiled layers first *selective* recompute (the
    compiler keeps a share of the layer activations, at least half, and recomputes the cheapest of the rest) when it
    gives bigger micro-batches; full recompute only when the GPU would otherwise get too small a micro-batch to keep
    busy. On CPU, and under DeepSpeed, on. true / false: full recompute / none, never selective."""
    memory_gib: float | None = Field(None, gt=0)
    """GPU memory (GiB) a training process may use. On a GPU without DeepSpeed, the micro-batch (and so
    grad_accum) and, when gradient_checkpointing is auto, recompute are chosen to fit it from an estimate of the
    model's memory per token (vlmops/train/memory.py), keeping batch_size x grad_accum samples per optimizer step.
    null: 90% of the GPU. Ignored on CPU and under DeepSpeed (batch_size and grad_accum are used as written).
    LoRA training processes on a GPU use PyTorch's expandable memory segments (PYTORCH_CUDA_ALLOC_CONF, unless
    set), so that micro-batches of varying lengths do not leave the allocator holding memory beyond the plan (full
    training does not: its step measured twice as slow with them)."""
    auto_batch: bool = True
    """Let `memory_gib` re-split batch_size x grad_accum into micro-batches (the same samples per step, so the
    same learning). false: batch_size and grad_accum exactly as written."""
    packing: bool | Literal["auto"] = "auto"
    """Padding-free training batches: the samples of a micro-batch are concatenated into one row, position ids
    restart per sample and attention stays within each sample (model.attn sdpa, flex_attention or
    flash_attention_2). Same learning as padded batches, no compute spent on padding. auto: on with a CUDA GPU when
    model.attn is flex_attention or flash_attention_2, which skip the masked-out blocks, and with sdpa when padded
    batches of the training split would be at least 15% padding: the language model then attends with
    flex_attention (sdpa computes a packed row densely under a block-diagonal mask: 0.75x the padded batches on an
    H200, 7b LoRA; packed FlexAttention ran 4x the padded batches on mixed-length data, 1.3b LoRA). Off on CPU (the
    tiny demo and tests: no FlexAttention backward, pinned losses). Evaluation batches are never packed."""
    packing_tokens: int | None = Field(None, ge=16)
    """Tokens per packed micro-batch. null: the memory policy's choice on a GPU, else train.batch_size x the
    training split's mean sample length (so a step holds about as many samples as unpacked); never less than the
    longest sample. Set, it fixes the micro-batch: batch_size and grad_accum are then used as written."""
    group_by_length: bool = False
    """Unpacked batches of samples of similar length (less padding), in a seeded random order. Ignored when
    packing."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder layer of the language model. auto: on with a CUDA GPU (not under DeepSpeed),
    off on CPU. The first steps are slower while the layers compile (~30 s), and a step with a batch length not
    seen before compiles again: packed rows are filled to one length, padded batches pad up to at most 16 lengths
    chosen from the data."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Fused LM head + cross-entropy over the answer positions (Liger Kernel, `pip install 'vlmops[gpu]'`): the
    logits over the 102,400-word vocabulary are never materialised. auto: on with a CUDA GPU when Liger Kernel is
    installed (not under DeepSpeed)."""
    vision_graphs: Literal["auto", "off"] = "auto"
    """Run frozen vision towers from CUDA graphs (one image per graph, replayed per image): the eager towers are
    hundreds of small kernel launches per micro-batch, during which the GPU mostly waits. auto: on with a CUDA GPU
    when nothing in the towers or the aligner trains (not under DeepSpeed); the towers' results are the same. The
    graphs keep one image's working memory of the towers (the 7b's SAM: ~1 GiB)."""
    sam_attention: Literal["folded", "sdpa", "flex"] = "folded"
    """The 7b's SAM tower, on a GPU (not under DeepSpeed): transformers' attention (sdpa) materialises its
    relative-position bias as a dense tokens x tokens tensor per head (~400 MB per image in each global-attention
    layer), copies it once more and feeds it to SDPA's memory-efficient kernel. folded appends the bias's two small
    tables to the query and one-hots of each key's row and column to the key (vlmops.models.sam_attention), the same
    attention through SDPA's fused kernels with no bias tensor; flex adds the bias inside a compiled FlexAttention
    kernel in the global-attention layers. Measured on an H200 (bench/RESULTS.md session 13): SAM-B over 8 images at
    1,024 px 48.2 ms folded against 85.4 sdpa (peak 1.0 against 6.6 GiB; in bf16 closer to the float32 result), the
    7b LoRA memory-free step 16,864 against 15,890 tokens/s; flex was slower than sdpa (session 11). On CPU, and for
    the 1.3b (no SAM), nothing changes."""
    sam_compile: Literal["auto", "off"] = "auto"
    """The 7b's SAM tower through torch.compile (with `sam_attention: folded`; the towers frozen; a CUDA GPU, not under
    DeepSpeed): the compiler fuses the layer norms, GELU, window partitions and the folded query and key around the
    matmuls. Measured on an H200 (bench/RESULTS.md session 14): 8 images at 1,024 px 25.4 ms against 43.0 eagerly,
    in bf16 closer to the float32 result. The first step compiles it (~20 s), before the towers' CUDA graphs are
    captured. off: the eager tower."""
    deepspeed: str | None = None
    """DeepSpeed: a preset (zero2, zero3, zero3-offload, zero3-offload-partial; see vlmops/train/deepspeed_config.py)
    or a path to your own JSON. null: no DeepSpeed, except that full training on a GPU it would not fit (one sample of
    data.max_length tokens with recompute, float32 master weights, in train.memory_gib) takes the
    zero3-offload-partial preset instead of failing for memory (with model.dtype auto and train.auto_batch true, the
    defaults; otherwise null stays null; several processes without DeepSpeed count DDP's gradient buckets). zero2 and
    zero3 shard state across processes: a run of one process trains as with null, with a warning (they would shard
    nothing, cost speed and turn off the run's own levers), so one config serves one GPU and several."""
    nproc_per_node: int | None = Field(None, ge=1)
    """GPUs (processes) on this node. null: the NPROC_PER_NODE environment variable, else 1."""
    logging_steps: int = Field(1, ge=1)
    """Log the training loss every N optimizer steps."""
    eval_steps: int | None = Field(None, ge=1)
    """Compute the eval loss every N steps. null: once per epoch."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Eval samples per device per forward pass of the eval loss (no backward: it may be larger than training's
    micro-batch). null: the run's micro-batch (train.batch_size, or on a GPU the memory policy's split of it, see
    `memory_gib`), which fits. The evaluation after training answers with `infer.batch_size`."""
    save_steps: int | None = Field(None, ge=1)
    """Write a checkpoint every N steps. null: at each evaluation (every `eval_steps`, else once per epoch)."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints to keep (the best one is always kept)."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint of this run folder; never: start over; unfinished:
    continue a stopped run but start a finished one (result.json) over, as the DVC sft stage needs; or a
    checkpoint path."""


class MergeConfig(Section):
    parity_atol: float | None = Field(None, gt=0)
    """Largest allowed logit difference, in float32, of the merged model against the adapter on its base, and of
    the folder written against the merged model rounded to model.dtype (vlmops.train.merge). null: 1e-3."""


def no_room_for_a_prompt(max_context: int, max_new_tokens: int) -> str | None:
    """Why requests of `max_context` tokens hold no prompt beside an answer of `max_new_tokens` (every record would
    be rejected, one by one), naming both keys and what to change; None where they leave room."""
    if max_new_tokens < max_context:
        return None
    return (
        f"infer.max_context {max_context} leaves no room for a prompt beside infer.max_new_tokens {max_new_tokens} "
        "(a request holds its prompt and its answer): every record would be rejected. Raise infer.max_context "
        "above infer.max_new_tokens by the longest prompt (an image is 576 prompt tokens), or unset it to size it "
        "to the job's prompts, or lower infer.max_new_tokens"
    )


class InferConfig(Section):
    max_new_tokens: int = Field(64, ge=1)
    """Longest generated answer, in tokens."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate call in batch inference."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding; above 0: sampling (both engines: the fast one on CUDA, vlmops.infer.sampling)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold (temperature > 0): the fewest most likely tokens whose probabilities add up to
    this. 1: off."""
    top_k: int = Field(0, ge=0)
    """Sampling from the k most likely tokens only (temperature > 0). 0: off (transformers' `generate` would apply
    its default of 50 when unset; here it is off unless asked for)."""
    repetition_penalty: float = Field(1.0, gt=0)
    """Above 1 discourages repeating tokens (any token of the prompt or the answer so far), greedy or sampled."""
    seed: int = 0
    """Sampling (temperature > 0): the fast engine draws each record's tokens from a stream of this seed and the
    record's key, so rerunning a job, a resumed shard or another batching draws the same answers (in bf16, up to the
    rounding the batching changes). The plain engine seeds `generate` per batch from it."""
    workers: int | None = Field(None, ge=1)
    """Batch inference processes, one per GPU of this machine. null: every visible GPU (1 without CUDA)."""
    engine: Literal["auto", "plain", "fast"] = "auto"
    """Batch generation engine. plain: `model.generate` on fixed batches, any device; fast: CUDA (static KV cache,
    continuous batching); auto: fast on CUDA for a job of at least `fast_min_records` records to answer, else plain.
    Both take every setting of how tokens are picked (temperature, top_p, top_k, repetition_penalty)."""
    fast_min_records: int = Field(500, ge=0)
    """infer.engine auto: the fewest records a job (or a process's share of it) must have left to answer for the fast
    engine; below, plain `generate`, because the fast engine's compiling and capturing (25-100 s) costs more than it
    saves. Measured on an H200 (bench/RESULTS.md session 30), the whole command: 64 records 1.3b plain 18.8 s
    against fast 29.8 s (its compile cache filled) / 47.3 s (empty), 7b 26.8 against 45.1 / 105.8; 512 records 1.3b
    36.9 against 30.9 / 53.7, 7b 82.5 against 58.4 / 106.0; 1,024 records 1.3b 62.9 against 33.4 / 64.5 (session 31).
    The crossover: ~260-350 records with a filled compile cache, ~700-1,000 with an empty one. 0: the fast engine
    whatever the size."""
    max_batch: int = Field(512, ge=1)
    """Fast engine: prompts decoded at once (a finished one's slot is refilled at once from the waiting
    prompts); more is faster until the GPU's memory bandwidth is saturated. Capped by memory_gib: each slot holds
    max_context tokens of K/V (at 2,048: 1.3b 0.375 GiB, 7b 0.94 GiB; a job of one-image prompts sizes them to ~768),
    so a 7b's slots (and a 1.3b's on an 80 GB card) may be set by the memory, not by this.
    Measured on an H200 (1.3b, 768-token slots, bench/RESULTS.md sessions 25 and 26): `vlmops batch-infer` 152.3 and
    152.5 images/s once started with 512 against 149.4 and 148.6 with 256 (the default before; 146 against 138 with
    128 in session 23); the engine's call of B prompts 14.0k generated tokens/s at 256 and 14.9-15.3k at 768."""
    max_context: int | None = Field(None, ge=2)
    """Fast engine: prompt + answer tokens one slot holds. null: sized to the job (its plan counts every record's
    prompt tokens: the longest prompt + max_new_tokens, rounded up to 128, at most the model's
    max_position_embeddings), or 2048 outside a job. The K/V cache is slots x this, so short prompts get more slots
    from the same memory (an image is 576 prompt tokens; on an H200, a 7b job of one-image records ran at 41.7
    images/s once started with 1024 against 37.0 with 2048: bench/RESULTS.md session 24). Set it to cap the slots: a
    record that does not fit goes to the job's rejects with its token count, whichever engine answers it (the plain
    engine's own limit is the model's `max_position_embeddings`); set, it is part of the job's identity. To answer
    such a record, raise this and answer the job's rejects again into a new output folder (infer.retry_rejects).
    It must exceed max_new_tokens (the config is refused otherwise, before any model is downloaded), and a job
    none of whose prompts fits beside max_new_tokens is refused once its inputs are read, before the model's weights
    load: set, the plan counts every record's prompt tokens to check it (as it does to size the slots)."""

    @field_validator("max_context")
    @classmethod
    def _room_for_a_prompt(cls, value: int | None, info: ValidationInfo) -> int | None:
        answer = info.data.get("max_new_tokens")  # absent where it failed its own check
        if value is not None and answer is not None and (problem := no_room_for_a_prompt(value, answer)):
            raise ValueError(problem)
        return value

    memory_gib: float | None = Field(None, gt=0)
    """Fast engine: GPU memory (GiB) the model's weights and KV cache may use; it caps the slots (e.g. 75 keeps
    a 7b inside an 80 GB card). null: 90% of the GPU."""
    decode_window: int = Field(1, ge=1)
    """Fast engine: decode steps queued on the GPU before the host reads their tokens back (1: after every step,
    the GPU idling while the host does its bookkeeping). A row that stops inside a window keeps its slot until the
    window ends. Answers are the same for any value. Measured on an H200 (1.3b, batches of 32 and 256): a window of 8
    decoded no faster than 1, so the default stays 1."""
    column_bucket: int = Field(32, ge=1)
    """Fast engine: a decode step attends to the cache columns up to the next multiple of this past its rows'
    lengths, one CUDA graph per (rows, columns) bucket. Smaller reads fewer unused columns for more graphs (each
    captured once, at its first step). Measured on an H200 (bench/RESULTS.md sessions 19 and 24): 32 against 128 +2.8%
    (1.3b, 256 rows); 8 or 16 against 32 +0.5-0.8% in the engine's call of 768 prompts, not yet measured in a job."""
    lookahead: bool = True
    """Fast engine: launch each decoding window before reading the one before it back, so that the GPU has the next
    step queued while the host waits for the last one's tokens and does its bookkeeping. A row that stops is seen one
    window later (its slot decodes one more window of dropped tokens before it is refilled). Answers are the same
    either way; false reads each window before launching the next. Measured on an H200 (bench/RESULTS.md session
    24): a 1.3b job 145.8 images/s once started against 141.0, the engine's call of 768 prompts 14.8k generated
    tokens/s against 14.6k."""
    vision_graphs: bool = True
    """Fast engine: run the vision towers of each prefill batch from CUDA graphs, captured once per number of images
    (the eager towers are hundreds of small kernels launched from the thread that also drives decoding). The graphs
    keep the towers' working memory for the engine's life (the 7b's SAM: ~0.8 GiB per image of a prefill batch, within
    what the engine sets aside for prefill). Measured on an H200 (1.3b, bench/RESULTS.md session 9): `vlmops
    batch-infer` 91.3 steady images/s against 79.2 eagerly, the engine alone 9.3k against 8.4k tokens/s at batch 256.
    Answers are the same either way; false runs the towers eagerly."""
    sam_attention: Literal["folded", "sdpa", "flex"] = "folded"
    """Fast engine on CUDA, the 7b's SAM tower: folded, sdpa or flex, as `train.sam_attention` (where the choices and
    their measurements are described). The engine's own figure with folded is not measured yet; the tower alone ran
    1.77x faster (session 13). flex in the global layers was slower (34.5 against 28.2 ms per prompt, session 11).
    Answers are the same attention either way."""
    sam_compile: bool = True
    """Fast engine on CUDA with `sam_attention: folded`: the 7b's SAM tower through torch.compile, as
    `train.sam_compile` (the image count a dynamic size, so one compilation serves every prefill batch; ~20 s at the
    first prefill). false: the eager tower."""
    siglip_compile: bool = True
    """Fast engine on CUDA: the SigLIP tower (the 384 px tower of both models) through torch.compile, with the image
    count a dynamic size, fusing the layer norms, biases, GELU and residual adds around its matmuls; compiled at the
    first prefill (~10 s). Measured on an H200 (bench/RESULTS.md session 16): the 1.3b's prefill 4.31 against 4.63 ms
    a prompt, its whole call 7,272 against 6,974 tokens/s at batch 32 and 12,963 against 12,692 at 256; the 7b's 3,588
    against 3,522 at 128. Its fused kernels round as the eager tower's do (bf16: the trained tiny model's greedy
    answers equal `generate`'s on 192 of 192 positions). false: the eager tower."""
    prefill_graphs: bool = True
    """Fast engine: run the language model's half of each prefill (its layers over the prompt embeddings) from CUDA
    graphs, one per number of prompts and width, the widths padded up to multiples of 32 tokens. Eagerly, each
    layer's compiled functions and attention are launched from Python: a profiled 1.3b prefill of 16 prompts kept the
    GPU busy 72 of its 105 ms. Measured on an H200 (bench/RESULTS.md sessions 10 and 11): the 1.3b engine 11.1k
    against 10.2k tokens/s at batch 256 (the same at 32), `vlmops batch-infer` over 6,000 records 70.7 against 65.0
    images/s; the 7b the same speed, its memory-budget run +0.4 GiB (70.8 GiB reserved at `memory_gib` 75).
    Answers are the same either way; false prefills eagerly."""
    overlap_prefill: bool = False
    """Fast engine: run each prefill on a CUDA stream of its own while the rows already in their slots go on decoding
    on a high-priority stream (prefill is compute-bound, a decode step bandwidth-bound, so they can share the GPU);
    the prompts join the decoding batch when their prefill is done. Answers are the same either way (a CPU test runs
    the same interleaving, a GPU test the same schedule with and without the second stream). Measured slower on an
    H200 (bench/RESULTS.md session 12): the prefill's matmuls take the SMs the decode steps need, decoding ran at half
    speed beside them, and the 1.3b's whole call 6.2k / 9.8k tokens/s at batch 32 / 256 against 6.4k / 10.6k; so
    off. Again in session 16: 6.9k / 9.8k against 6.9k / 11.5k, also with 32 or 64 SMs left to decoding (torch's
    cuBLAS SM carve-out around each prefill: 6.0-6.3k / 9.1-9.9k)."""
    shard_size: int = Field(1000, ge=1)
    """Records per shard of a batch inference job: the unit written at once, resumed and handed to a worker.
    Part of the job's identity (a different size is a different job)."""
    max_shards: int | None = Field(None, ge=1)
    """Batch inference job: answer at most this many of the shards not yet done, then stop without the manifest (a
    trial run: read the first parts, then run the same command without it to go on; the job and its output are the
    same, so nothing answered is redone). null: every shard. Not part of the job's identity."""
    retry_rejects: str | None = None
    """Batch inference job: answer only the records the finished job in this output (a folder or s3:// prefix)
    rejected, read where they are in the same --input (after the images they lacked were added, or with a larger
    infer.max_context), into a new --output: a job of its own (the records chosen are part of its identity); its
    results carry the same keys as that job's would have."""
    on_error: Literal["skip", "fail"] = "skip"
    """A record that cannot be answered (malformed line, missing or unreadable image). skip: write it to
    rejects.jsonl with its file, line and reason and go on; fail: stop the job at the first one."""
    track: bool = False
    """Log each batch inference job to MLflow (tracking.uri): a run tagged with the model version, with the
    job's metrics and its manifest."""


class EvalConfig(Section):
    metric: Literal["exact_match"] = "exact_match"
    """How a prediction is scored against its reference answer (exact match, case, spacing and final punctuation
    aside: vlmops/answers.py)."""
    evaluate_base: bool = True
    """Also run the eval split through the base model, to report the gain."""


class TrackingConfig(Section):
    uri: str = "sqlite:///outputs/mlflow.db"
    """MLflow tracking URI: a SQLite file for one machine, http(s)://server for a team."""
    experiment: str = "vlmops"
    """MLflow experiment name."""


class PromotionConfig(Section):
    """The gate a challenger passes to become `champion` (the `promote` flow, `vlmops promote`)."""

    metric: Literal["accuracy"] = "accuracy"
    """What challenger and champion are compared on: the share of the evaluation set answered right, scored
    with `eval.metric`."""
    min_margin: float = Field(0.0, ge=0.0, le=1.0)
    """How much the challenger must beat the champion by (0.02: two points of accuracy) to replace it; 0: at
    least as good. Without a champion the first version is promoted whatever its score."""
    eval_file: str | None = None
    """The evaluation set both answer (.json/.jsonl, records ending with the reference answer). null: the
    eval split of the challenger's dataset snapshot (restored from the DVC remote when not on this machine)."""


class RegistryConfig(Section):
    model_name: str = "vlmops-demo"
    """Registered model name in the MLflow model registry."""
    alias: str = "challenger"
    """Alias given to the newly registered version (not `champion`: only the promotion gate moves that one)."""
    auto_promote: bool = False
    """After registering, run the promotion gate in the same retrain flow run (else `vlmops promote` or the
    `promote` deployment does it later)."""
    promotion: PromotionConfig = PromotionConfig()
    """The champion/challenger gate."""

    @field_validator("alias")
    @classmethod
    def _not_champion(cls, value: str) -> str:
        if value == "champion":
            raise ValueError(
                "champion is the alias the promotion gate moves; registering with it would make every new version "
                "the champion unchecked: use another alias (the default, challenger) and `vlmops promote` or "
                "registry.auto_promote: true"
            )
        return value


class VersioningConfig(Section):
    enabled: bool = True
    """Track the dataset snapshot and the merged model with DVC and push them to the remote."""
    repo: str | None = None
    """DVC repository root (created with `dvc init` when missing); it must contain run.output_dir.
    null: run.output_dir itself."""
    remote_name: str = "local"
    """Name of the DVC remote to push to."""
    remote_url: str | None = None
    """URL of that remote: a folder, or s3://bucket/prefix. null: `<run.output_dir>/dvc-remote`."""


class StorageConfig(Section):
    endpoint_url: str | None = None
    """S3 endpoint (SeaweedFS, MinIO, ...). null: AWS, or the AWS_ENDPOINT_URL environment variable."""
    region: str | None = None
    """S3 region. null: boto3's default chain."""
    url_max_mib: float = Field(20.0, gt=0)
    """Largest image downloaded by http(s) URL, in MiB; a larger one is refused, not cut (a batch inference job's
    reject: another value than the default is part of the job's identity)."""
    url_timeout_s: float = Field(30.0, gt=0)
    """Time limit for one image download (each try, and the whole body)."""
    url_allow_networks: list[str] = []
    """Non-public networks that image URLs may reach, as addresses or CIDRs (e.g. "10.1.2.0/24"). By default
    an http(s) URL (or a redirect) that resolves to a loopback, private or link-local address is refused (a batch
    inference job's reject: set, this is part of the job's identity)."""

    @field_validator("url_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
        return value


class PipelineConfig(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    infer: InferConfig = InferConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    versioning: VersioningConfig = VersioningConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("train")
    @classmethod
    def _lora_targets_not_empty(cls, value: TrainConfig) -> TrainConfig:
        if value.mode == "lora" and not value.lora.targets.strip():
            raise ValueError("train.lora.targets is empty: use qkv, all-linear, ALL or a regex")
        return value

    @model_validator(mode="after")
    def _eval_source(self) -> PipelineConfig:
        if self.data.train is not None and self.data.eval is None and self.data.eval_ratio == 0:
            raise ValueError("no eval data: set data.eval to a file or data.eval_ratio above 0 (e.g. 0.1)")
        return self

    def to_flat_dict(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params (passwords in URIs masked)."""
        return _flatten(_redacted(self.model_dump(mode="json")))


class ConfigError(UserInputError):
    """Every problem of a config at once, one line each: `[file:line] key.path: message`."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"{counted(len(problems), 'problem')}{where}:\n" + "\n".join(f"  - {p}" for p in problems))


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load pipeline.yaml (or the defaults when path is None), apply dotted overrides, validate.

    Overrides are `key.path=value` strings (the value parsed as YAML) or a {dotted key: value} dict;
    they must name existing keys. A config may start with `base: other.yaml` (relative to the file) to
    extend another file; an error is reported at the file and line that set the key.
    """
    data: dict[str, Any] = {}
    lines: dict[str, KeyLocation] = {}
    source = None
    if path is not None:
        source = str(path)
        data, lines = _read_yaml_with_bases(Path(path), ())
    problems: list[str] = []
    given = _parse_overrides(overrides)
    for key, value in given.items():
        try:
            _set_dotted(data, key, value)
        except ValueError as err:
            problems.append(str(err))
        lines = {k: v for k, v in lines.items() if not _under(k, key)}  # an override is no longer the file's
    if problems:
        raise ConfigError(problems, source)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_describe(e, lines, given) for e in err.errors()], source) from None


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML, every key present; passwords in URIs masked (the file is saved with runs
    and logged to MLflow, and credentials belong in the environment)."""
    return yaml.safe_dump(_redacted(config.model_dump(mode="json")), sort_keys=False)


def _redacted(value: Any) -> Any:
    from vlmops.redact import redact_uri

    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact_uri(value) if isinstance(value, str) else value


KeyLocation = tuple[str, int]
"""(file, line) where a config key was set."""


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _read_yaml_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, KeyLocation]]:
    """The file's mapping merged over its `base:` chain, and where each dotted key was set."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (copy pipeline.yaml and edit it)")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"], str(path))
    if twice := _keys_set_twice(node):  # YAML keeps the last of them without a word
        raise ConfigError([f"{path}:{line}: {message}" for line, message in twice], str(path))
    lines = {key: (str(path), line) for key, line in (_key_lines(node) if node is not None else {}).items()}
    base = data.pop("base", None)
    if base is None:
        return data, lines
    where = f"{path}:{lines['base'][1]}"
    if not isinstance(base, str) or not base.strip():
        raise ConfigError([f"{where}: base: must be the path of another config file, not {base!r}"], str(path))
    base_path = (path.parent / base).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(base_path) :], base_path))
        raise ConfigError([f"{where}: base: {base} makes a cycle: {cycle}; remove one of these base: keys"], str(path))
    if not base_path.is_file():
        raise ConfigError([f"{where}: base: {base_path} does not exist"], str(path))
    base_data, base_lines = _read_yaml_with_bases(base_path, chain)
    lines.pop("base")
    # A key set in this file replaces the base's value for it and everything under it.
    kept = {k: v for k, v in base_lines.items() if not any(_under(k, own) and _is_leaf(data, own) for own in lines)}
    return _deep_merge(base_data, data), {**kept, **lines}


def _is_leaf(data: dict[str, Any], dotted: str) -> bool:
    """Whether `dotted` names a value (not a section) in `data`: a value replaces the base's whole subtree."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _keys_set_twice(node: yaml.Node | None, prefix: str = "") -> list[tuple[int, str]]:
    """(line, message) for each key set again in the same mapping, which YAML would settle by dropping the first."""
    found: list[tuple[int, str]] = []
    if not isinstance(node, yaml.MappingNode):
        return found
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key_node.value != "<<" and key in first:
            found.append((line, f"{key} is set twice (first on line {first[key]}); keep one of them"))
        first.setdefault(key, line)
        found += _keys_set_twice(value_node, key + ".")
    return found


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> line number in the file, for error messages."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def _describe(error: Any, lines: dict[str, KeyLocation], overrides: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; `vlmops config --show` prints every valid key)"
    elif error["type"] == "literal_error":
        message = message.replace("Input should be", "must be")
    elif error["type"] == "value_error":  # a validator's own words, which pydantic prefixes with "Value error, "
        message = message.removeprefix("Value error, ")
    given = next((k for k in overrides if _under(key, k)), None)
    if error["type"] == "list_type":
        message += f" (a YAML list: {given or key}=[a, b], quoted in a shell)"
    if given is not None:  # the override's words, not the file's key: the file may not set it at all
        shown = f"override {given}={_shown_value(overrides[given])}"
        return f"{shown}: {message}" if given == key else f"{shown}: {key}: {message}"
    location = None
    for i in range(len(loc), 0, -1):
        location = lines.get(".".join(loc[:i]))
        if location is not None:
            break
    where = f"{location[0]}:{location[1]}: " if location else ""
    return f"{where}{key}: {message}"


def _shown_value(value: Any) -> str:
    """An override's value as it would be written after `=` (YAML's flow style), cut short past 80 characters."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        parsed = dict(overrides)
    else:
        parsed = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError([f"override {item!r}: write it as key.path=value, e.g. train.epochs=2"])
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    _refuse_credentials(parsed)
    return parsed


def _refuse_credentials(overrides: dict[str, Any]) -> None:
    """Overrides are flow-run parameters: the Prefect server stores them, its UI shows them, and a shell keeps
    them in its history. A password or token in one would be kept where the redaction never reaches."""
    from vlmops.redact import redact_uri

    def holds_secret(value: Any) -> bool:
        if isinstance(value, dict):
            return any(holds_secret(v) for v in value.values())
        if isinstance(value, list):
            return any(holds_secret(v) for v in value)
        return isinstance(value, str) and redact_uri(value) != value

    keys = [key for key, value in overrides.items() if holds_secret(value)]
    if keys:
        raise ConfigError(
            [
                f"override {key}: holds a password or token; overrides are stored as flow-run parameters, so "
                "put credentials in the environment instead (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, PGPASSWORD; see .env.example)"
                for key in keys
            ]
        )


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    fields: dict[str, Any] | None = PipelineConfig.model_fields
    node = data
    for i, part in enumerate(parts):
        if fields is None or part not in fields:
            known = ", ".join(sorted(fields)) if fields else "nothing (it is a value, not a section)"
            raise ValueError(f"override {key}: unknown key {'.'.join(parts[: i + 1])}; valid keys there: {known}")
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            node[part] = copy.deepcopy(value)
            return
        fields = annotation.model_fields if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
