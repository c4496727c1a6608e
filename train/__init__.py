"""Fine-tuning: converted data + a PaliGemma checkpoint -> a run folder of checkpoints (`paliseg train`).

For the later stages (infer, eval), a run folder is read with `train.checkpoints`:

    from train import checkpoints
    checkpoints.list_steps(run_dir)                      # [25, 50, ...]: steps with a complete checkpoint
    train_cfg, model_cfg = checkpoints.read_run_config(run_dir)   # TrainConfig, ModelConfig
    model_cfg, params = checkpoints.load_run(run_dir, step)       # full tree, LoRA folded into the base
    model_cfg, params = checkpoints.load_run(run_dir, step, merge_lora=False)   # adapters kept

Step 0 (the starting point) is `train.params.join(*train.params.initial(train_cfg, model_cfg))`. To export a
merged model: `paliseg.checkpoints.save(path, params, model_cfg)` on what `load_run` returns.

Modules: `config` (TrainConfig, resolution and checks), `data` (deterministic input pipeline), `params`
(trainable sets and initial params), `optim` (optax), `step` (loss and compiled step), `sharding` (mesh),
`checkpoints` (orbax run folder), `trainer` (the run loop), `commands` (the CLI).
"""
