"""Tools built on the layers below: size, tune, ablate, report, quickstart."""
