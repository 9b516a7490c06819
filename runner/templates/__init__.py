"""What instrument scientists own: templates and instrument.toml, typed parameters (forms and
checks), and their default values kept on Kafka."""
