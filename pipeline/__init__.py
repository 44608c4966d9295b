"""TransFGU as a staged, cached pipeline; the stages are declared in `pipeline.stages`."""
