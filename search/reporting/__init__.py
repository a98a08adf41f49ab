"""The report of an experiment: the search's figures from its trials and study (`search_figures`), the final
model seen from inside (`model_figures`), and the self-contained report.html that holds them (`page`)."""
