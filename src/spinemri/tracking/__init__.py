"""MLflow: the store, a run's life, reports logged into runs, the registry policy, dataset lineage, UI links."""
