"""The parameter server: holds the weights, leases batches, applies gradients."""
