"""Training: experiment configs, the LightningModule, optimizer + schedules, callbacks, runs.

    config.py           omegaconf schemas and YAML composition (``load_config``, ``ConfigError``)
    optim.py            AdamW parameter groups, WSD / cosine / constant schedules
    module.py           ``JetMoeLitModule``
    callbacks.py        plain-text progress log, validation on the last step
    run.py              ``train`` / ``generate`` / ``evaluate`` on run directories
    expert_metrics.py, expert_callback.py   routing statistics and the expert-utilization report

Nothing is imported here, so ``import jetmoe.training.config`` stays light.
"""
