"""Continual-learning benchmark: CLNP against fine-tuning, EWC and single-task networks, in one run.

Every method sees the same tasks, the same data (same validation hold-out), the same network spec and
the same optimiser schedule (CLNP's dense phase of the `--preset` config: Adam, learning rate and its
schedule, dropout, batch size, epochs), and is measured on the same machine in the same run (one process, or the
processes of a split run merged with `--merge`, see the end of this text).

Scenarios and measurements
--------------------------
* Headline: permuted MNIST, tasks ``permuted-mnist:1`` .. ``permuted-mnist:N`` (seed 0 would not be the
  identity either, 1..N simply matches "task 1, task 2, ..."), an MLP (default 784-2000-2000), one head
  per task. Methods:

  - ``CLNP``: `trainer.clnp.learn_task` driven in-process with the `--preset` config (only epochs and the seed
    changed), no repository and no ONNX. After each task: FREE units per layer, units owned by every
    task per layer, earlier units reused per layer, validation accuracy, and a zero-forgetting check:
    every earlier task's logits on a fixed probe batch (its first 256 test images) are compared with
    `torch.equal` to the logits recorded right after that task was learned.
  - ``fine-tuning``: the same `MaskedNetwork` with all-ones masks, a new head per task, every hidden
    weight trainable (no protection).
  - ``EWC``: fine-tuning plus lambda/2 * sum_i F_i (theta - theta*_i)^2 over the hidden weights (diagonal
    Fisher of the log-likelihood of labels sampled from the model, exact per-sample gradients, on
    `--ewc-fisher-samples` training samples, accumulated over tasks). Lambda is chosen on validation data:
    each value of `--ewc-lambdas` learns the first `--ewc-select-tasks` tasks, the best mean validation
    accuracy after the last of them wins.
  - ``single-task``: a fresh network per task (the reference without any sharing).

  Per method: the accuracy matrix A[i][j] (test accuracy on task i after learning task j, j >= i), the
  average accuracy after the last task, backward transfer (mean over i < N-1 of A[i][N-1] - A[i][i];
  negative = forgetting) and the training wall time.
* Graceful-forgetting sweep: CLNP again with each `--sweep-max-drop` value on the first `--sweep-tasks`
  tasks; average accuracy against the FREE units left. CLNP is deterministic and task-by-task, so the
  value equal to the headline's max_drop is read off the headline run's prefix when the settings match.
* Training cost: samples/second of CLNP's training step (`TaskTrainer.run_epochs` over the FREE units: grad masks and the
  L1 activity penalty) against a plain step of the same network through the same loop, interleaved.
* CNN (`--cnn`, default on): split MNIST (pairs of digits), CLNP, fine-tuning and single-task (EWC with
  `--cnn-ewc-lambda`), with filters per layer per task.

Outputs in `--out` (default benchmarks/results for a full run of every method, else a new temporary folder):
continual.json, continual.md and PNG plots. From the repository root:

    python -m benchmarks.continual --data-dir ../shared/data            # the full run (hours on 2 CPU cores)
    python -m benchmarks.continual --data-dir ../shared/data --quick    # about a minute

Every learner is seeded from `--seeds` alone, so a method learns the same thing whether it runs beside the
others or on its own (a test checks this). On a machine with two or more cores the full run can therefore
be split into processes that run side by side (one torch thread each) and merged:

    python -m benchmarks.continual --data-dir ../shared/data --out /tmp/a --methods clnp,single \
        --no-cnn --cost-steps 0 &
    python -m benchmarks.continual --data-dir ../shared/data --out /tmp/b --methods finetune,ewc \
        --sweep-max-drop= &
    wait && python -m benchmarks.continual --merge /tmp/a /tmp/b --out benchmarks/results

Modules: record (the typed records of continual.json), learners (the methods), scenarios (task sequences and
the sections of a run), estimate (the predicted wall time), report (continual.md and the plots), merge
(`--merge`), cli (parse_args and main); `python -m benchmarks.continual` runs cli.main.
"""
