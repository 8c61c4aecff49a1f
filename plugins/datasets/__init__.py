"""First-party dataset plugins: ``ptb``, ``sum_game`` and ``echo`` (see each module)."""
