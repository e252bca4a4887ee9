"""infertop's Textual front end and the `infertop` command."""
