"""pscnn: the command line, the wire protocol and the local launcher.

The roles live in their own packages: ``cnn_core`` (the network engine),
``server`` (the parameter server) and ``worker`` (trainers and evaluator).
"""
__version__ = "0.1.0"
