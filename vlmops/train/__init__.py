"""Fine-tuning DeepSeek-VL: LoRA or full SFT on the HF Trainer, launched in a child process.

sft.py            train(config, base_model, dataset, run_dir) -> TrainResult: the one training code path
launch.py         launch_training (subprocess / torchrun), `python -m vlmops.train.launch`
trainable.py      what trains: LoRA targets (qkv, all-linear, ALL, regex) and freezing per part
data.py           lazy dataset, max_length policies, the mixed text/image collator
trainer.py        VLTrainer: atomic checkpoints, a vision pass on every step; metrics callbacks
deepspeed_config.py, deepspeed_presets/   ZeRO-2 / ZeRO-3 / ZeRO-3 offload presets, user JSON checks
merge.py          merge_run + parity check (`vlmops export --merge-lora`, the flow's merge step)
rundir.py         the run folder layout
"""
