"""The parameter server's settings (ServerConfig), and how ``pscnn server`` and ``pscnn run`` make them."""
from __future__ import annotations

from dataclasses import dataclass, field

from cnn_core.data import batches_per_epoch, training_set_size
from pscnn.cli import DEFAULT_FINAL_EVAL_TIMEOUT, DEFAULT_STALENESS


@dataclass
class ServerConfig:
    bind: str = "tcp://*:5555"
    mode: str = "sync"
    staleness: int = DEFAULT_STALENESS
    epochs: int = 1
    batch_size: int = 64
    model: object = "seed"
    optimizer: dict = field(default_factory=lambda: {"name": "sgd", "lr": 0.05, "momentum": 0.9})
    seed: int = 0
    train_limit: int = 0
    test_limit: int = 0
    mnist_dir: str | None = None
    out: str = "runs/server"
    checkpoint_every: float = 30.0
    resume: bool = False
    lease_timeout: float = 30.0
    peer_timeout: float = 10.0
    final_eval_timeout: float = DEFAULT_FINAL_EVAL_TIMEOUT
    max_workers: int = 1024
    log_rejected: int = 20              # rejected-message log lines a second (0: no limit)
    wait_for_workers: int = 0
    start_timeout: float = 60.0
    log_steps: bool = True
    keys: str | None = None             # CURVE: the server's key folder (pscnn.curve); None: plain

    def to_json(self) -> dict:
        return dict(self.__dict__)


def config_from_args(args) -> ServerConfig:
    """The server's config from its CLI flags (or ``pscnn run``'s, which has no --bind)."""
    from pscnn.cli import optimizer_config, resolve_auto_schedule, ssp_staleness, start_timeout  # noqa: PLC0415
    num_samples = training_set_size(args.train_limit)
    updates = args.epochs * batches_per_epoch(num_samples, args.batch_size)
    return ServerConfig(bind=getattr(args, "bind", ServerConfig.bind), mode=args.mode, staleness=ssp_staleness(args),
                       epochs=args.epochs,
                       batch_size=args.batch_size, model=args.model,
                       optimizer=resolve_auto_schedule(optimizer_config(args), updates), seed=args.seed,
                       train_limit=args.train_limit, test_limit=args.test_limit, mnist_dir=args.mnist_dir,
                       out=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                       lease_timeout=args.lease_timeout, peer_timeout=args.peer_timeout,
                       final_eval_timeout=(DEFAULT_FINAL_EVAL_TIMEOUT if args.final_eval_timeout is None
                                           else args.final_eval_timeout), max_workers=args.max_workers,
                       log_rejected=args.log_rejected,
                       wait_for_workers=args.wait_for_workers or 0, start_timeout=start_timeout(args),
                       keys=getattr(args, "keys", None))
