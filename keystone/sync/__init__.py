"""GitOps: resolve a device's plan from a verified revision, diff, deploy, roll back."""
