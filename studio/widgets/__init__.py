"""Small reusable controls: forms from config metadata, pickers, progress panels."""
