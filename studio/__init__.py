"""Squeeze Studio: the desktop application over ``core`` (PySide6, pyqtgraph, superqt).

Nothing runs at import: ``studio.app.main()`` starts the application.
"""
