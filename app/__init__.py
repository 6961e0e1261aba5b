"""The application: settings, CLI, alert store, scheduler service, scale-out adapters."""
