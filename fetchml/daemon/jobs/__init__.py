"""Jobs: the model, the host inventory, the scheduler, the runner of attempts, retention and gc."""
