"""The trio service: the HTTP app, the dispatcher task, lifecycle and the command line."""
