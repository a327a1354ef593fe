"""The strategy zoo: every strategy except FedAvg, registered through the ``lightfed.strategies`` entry point."""
