"""The parameter server: holds the weights, leases batches, applies gradients.

``server.py`` is the server itself, the one owner of the run's state: its event loop, message
handlers, liveness, start barrier and end.  The rest stand apart from it, each one concept:
``config.py`` (its settings), ``router.py`` (its socket's options), ``peers.py`` (what it keeps of
each client), ``store.py`` (the parameters and the optimizer), ``work.py`` (the leased batches),
``consistency.py`` (a sync round and SSP's bound), ``eval_report.py`` (an evaluator's metrics,
checked), ``evaluations.py`` (the evaluation history), ``checkpoints.py`` (the checkpoint file it
writes), ``resume.py`` (a run folder's checkpoint, checked for --resume) and ``results.py``
(model.npz, summary.json and the plots).
"""
