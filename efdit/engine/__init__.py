"""The engine: what the commands run, built on the core packages — a config's model, diffusion and data
(build, datasets), the training loop and its pieces (train, ema, lr, trainlog, dry_run), generation (generate,
pictures), evaluation (evaluate), fine-tuning from a base (finetune), model files and checkpoints (files),
torch.distributed (distributed), paths (paths), and D²iT's stage training and pipeline (d2it_train,
d2it_pipeline). It imports nothing from the commands."""
