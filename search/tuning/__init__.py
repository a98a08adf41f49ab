"""The search machinery: one frozen `Settings`, the CLI helper, the Ray cluster and trial resources,
storage, the time budget, the Optuna study and warm starts, Tune's callbacks, and the trial records
(`trials.csv`)."""
