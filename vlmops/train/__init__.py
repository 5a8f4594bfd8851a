"""Fine-tuning DeepSeek-VL: LoRA or full SFT on the HF Trainer, launched in a child process.

sft.py            train(config, base_model, dataset, run_dir) -> TrainResult: the one training code path
launch.py         launch_training (subprocess / torchrun), `python -m vlmops.train.launch`
child.py          run_child: GPU work in a child process group (training, merging), output to a log file
trainable.py      what trains: LoRA targets (qkv, all-linear, ALL, regex) and freezing per part
data.py           lazy dataset (data.max_length through vlmops.data.length), the mixed text/image collator
trainer.py        VLTrainer: a vision pass on every step; callbacks: checkpoints marked complete, metrics
deepspeed_config.py, deepspeed_presets/   ZeRO-2 / ZeRO-3 / ZeRO-3 offload presets, user JSON checks
merge.py          merge_run + parity check; launch_merge runs it in a child process (the flow's merge step)
rundir.py         the run folder layout, checkpoint completeness, resume planning, run_config
"""
