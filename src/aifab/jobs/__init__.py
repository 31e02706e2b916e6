"""The job runtime: job records in the store, the control plane that runs the scheduling policy, the executors
that start attempts (a local process, a Ray actor), the HTTP service and its client. Uses aifab.schedule."""
