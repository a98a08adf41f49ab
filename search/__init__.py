"""The commands: every top-level module here is one `python -m search.<name>` (run, final, report,
evaluate, predict, export_model, lr_find, augment_preview), built the same way: `build_parser()`,
`main(argv) -> int` raising `UserError`, and `sys.exit(run_cli(main))`.

The library they share lives in the sub-packages, each named for its job: `tuning` (settings, Ray
cluster, storage, time budget, study, warm starts, Tune callbacks, trials.csv), `final_stage`
(candidates, retraining, scoring, outputs), `figures` (pictures of models and data), `reporting`
(the report page and its sections), `serving` (face detection, ONNX/TorchScript classifiers) and
`bias` (the per-group report).
"""
