"""The optional parts a run attaches to its send loop: the response cache (`--cache`), lanes
shared with the job's other pods through Redis (`--redis`) and metrics (`--metrics-port`,
`--pushgateway`).

Each is off unless asked for, and Redis and Prometheus are imported only then, so the core
loop in `runner` reads (and costs) the same without them. Attaching them and letting them go
happen here, in one order: the cache after the writer exists, the last metrics push after
the outputs are closed (its values are the run's final ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmbatch.run.cached import RunCache, key_base

if TYPE_CHECKING:
    from tmbatch.run.attempts import LineSender
    from tmbatch.run.progress import Progress
    from tmbatch.run.remote import RemoteOutput
    from tmbatch.run.runner import Runner


async def attach(runner: Runner, sender: LineSender, progress: Progress) -> None:
    """Everything the config asks for beside the core, once the writer and progress exist."""
    opts = runner.config
    remote = remote_of(runner)
    if remote is not None:  # -o URL: each request waits for its dispatch record's segment
        shipper = remote.start(lambda exc: runner.stop.on_io_error(str(exc)))
        sender.transport = shipper.guard(sender.transport)
    if runner.cache_file is not None:  # opened (and checked) by prepare()
        assert runner.writer is not None
        progress.cache = sender.cache = runner.cache = RunCache(
            runner.cache_file, key_base(runner.settings.base_url, opts.sim), runner.writer,
            opts.budget.prices)
        runner.cache_file = None
    if opts.fleet.redis and opts.fleet.job:  # lanes shared with the job's pods (docs: Fleet)
        from tmbatch.limits.shared import RedisLanes

        runner.admission.shared = RedisLanes(opts.fleet.redis, opts.fleet.job)
        if opts.tpm and opts.shard:  # the account's --tpm, one bucket for every shard
            runner.admission.tpm_fleet = opts.tpm * opts.shard[1]
        if opts.budget.limited:  # the job's budget, shared by its shards
            from tmbatch.spend.shared import RedisBudget

            runner.budget.shared = RedisBudget(
                opts.fleet.redis, opts.fleet.job, opts.shard[0] if opts.shard else 0,
                opts.fleet.budget_tokens, opts.fleet.budget_usd)
    if opts.fleet.observed:  # --metrics-port, --pushgateway (docs: Fleet)
        from tmbatch.run.metrics import observe

        runner.metrics = await observe(runner, sender, progress)


def remote_of(runner: Runner) -> RemoteOutput | None:
    """-o URL: the bucket's lease and segments (run.remote), held with the directory's lock."""
    lock = runner._lock
    return None if lock is None else lock.remote


def drop_unused_cache(runner: Runner) -> None:
    """A cache opened by prepare() for a run that never reached send()."""
    if runner.cache_file is not None:
        runner.cache_file.close()
        runner.cache_file = None


async def detach(runner: Runner) -> None:
    """After the outputs are closed: the bucket's last segment and its published outputs
    (raises StoreError, exit 4, when it cannot take them), the last metrics push (the final
    values), then Redis."""
    remote = remote_of(runner)
    try:
        if remote is not None:
            await remote.finish()
    finally:
        if runner.metrics is not None:
            await runner.metrics.close()
            runner.metrics = None
        if runner.admission.shared is not None:
            await runner.admission.shared.close()
            runner.admission.shared = None
        if runner.budget.shared is not None:
            await runner.budget.shared.close(runner.budget)
            runner.budget.shared = None
