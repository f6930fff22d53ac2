"""The admin and moderation dashboard. Today: the overview service (``dashboard.overview``),
which ``parley status`` prints and the dashboard's first page will render."""
