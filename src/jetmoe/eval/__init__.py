"""Downstream evaluation: multiple-choice tasks scored by log-likelihood, during training and through
lm-evaluation-harness afterwards.

    config.py     the ``downstream:`` experiment section (``DownstreamConfig``, ``TaskConfig``)
    tasks.py      ``MultipleChoiceTask``: JSON-lines files, ``datasets`` tables, the built-in ``stdlib_next_line``
    scoring.py    log-likelihood of every choice and ``acc`` / ``acc_norm``, computed as lm-evaluation-harness does
    callback.py   ``DownstreamEvalCallback``: scores the tasks every N optimizer steps, logs to TensorBoard
    harness.py    lm-evaluation-harness on an HF directory (``jetmoe eval RUN_DIR --tasks ...``)

Nothing is imported here: ``jetmoe.eval.tasks`` needs neither Lightning nor lm-evaluation-harness.
"""
