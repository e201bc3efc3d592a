"""Every served model (classifier, ensemble, localizer, the two-stage study model), one table of the input kinds they
take, their request checks, and batch prediction and export outside MLflow's server."""
