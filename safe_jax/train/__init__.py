"""SAFE domain fine-tuning: the sharded step (``step``), its losses, LoRA and rewards, and the
host loop around it (``loop``) with checkpoints, metrics and the config checks."""
