"""The parameter server: holds the weights, leases batches, applies gradients.

``server.py`` is the server itself: its event loop, message handlers, checkpoints and summary.
The rest stand apart from it: ``config.py`` (its settings), ``consistency.py`` (a sync round and SSP's
bound), ``peers.py`` (what it keeps of each
client), ``store.py`` (the parameters and the optimizer), ``work.py`` (the leased batches),
``eval_report.py`` (an evaluator's metrics, checked), ``evaluations.py`` (the evaluation history)
and ``resume.py`` (a run folder's checkpoint, checked for --resume).
"""
