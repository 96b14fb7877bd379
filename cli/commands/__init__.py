"""One module per `paraplan` subcommand."""
