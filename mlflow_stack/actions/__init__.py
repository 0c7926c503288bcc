"""Remote actions: commands run on a provisioned host whose outputs become results."""
