"""The config sections of a training run: run, model and data (what it starts from), train (with its lora and
freeze settings) and merge. Each key is documented by the docstring under it."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from vlmops.config.section import Section

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


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
    """Training data: a .json (list) or .jsonl file in the `conversations` or `messages` format, or a folder of them
    (`data/train` holding `part-0000.jsonl` ...: its .json/.jsonl files, subfolders included, read in sorted path
    order as one split, as `vlmops validate PATH` reads a folder; other files are not read). On S3 (the server of
    `storage`): an `s3://bucket/key.jsonl` object, or an `s3://bucket/prefix` read as a folder (its .json/.jsonl
    objects, sorted by key), each streamed in, its relative image paths keys under the object's prefix; the validate
    step is cached on the prefix's listing (each object's key, size and ETag). A folder must not hold
    `run.output_dir` or `rejects_file`. null: the demo dataset."""
    eval: str | None = None
    """Held-out eval data, same formats, a file, a folder or an S3 object or prefix: none of its files may be one of
    `train`'s (the training data by any name or URI, or a file or object both name, is refused). null: split
    `eval_ratio` off the training records."""
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
    allowed_roots: list[str] = []  # noqa: RUF012 (a pydantic field: copied per config)
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
