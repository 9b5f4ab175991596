"""The trio_mojo tutorial's package: worker targets that count words."""
