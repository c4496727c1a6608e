"""Fine-tuning: converted data + a PaliGemma checkpoint -> a run folder of checkpoints (`paliseg train`).

For the later stages (infer, eval), a run folder is one object, `train.run.Run`:

    from train.run import Run
    run = Run(run_dir)                                   # config.json read once
    run.steps                                            # [25, 50, ...]: steps with a complete checkpoint
    run.train_config, run.model_config                   # TrainConfig, ModelConfig
    model_cfg, params = run.load(step)                   # full tree, LoRA folded into the base (0: the base)
    model_cfg, params = run.load(step, merge_lora=False) # adapters kept
    run.resolve_step("best"), run.record_best({...})     # RUN_DIR/best.json, written by `paliseg eval`
    run.vae                                              # the identity of the VAE of the data's seg tokens

To export a merged model: `paliseg.checkpoints.save(path, params, model_cfg)` on what `run.load` returns.

To train from a program: `train.commands.run(train.run.resolve_config({...}))`, as `paliseg train` does.

Modules, each importing only those before it: `config` (TrainConfig and its checks), `sharding` (mesh),
`params` (trainable sets), `checkpoints` (orbax), `run` (a run folder, and where a new run starts),
`data` (deterministic input pipeline), `optim` (optax), `step` (loss and compiled step), `loop` (the one
run loop), the objectives `supervised` and `grpo` (reinforcement fine-tuning with the mask-IoU reward), and
`commands` (the CLI, which picks the objective).
"""
