"""One module per ``tq-deploy`` subcommand (see :mod:`tq_deploy.cli`)."""
