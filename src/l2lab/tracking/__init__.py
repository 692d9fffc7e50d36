"""MLflow: the store and its URI, a run's writes, the group writer, reading runs back, UI links."""
