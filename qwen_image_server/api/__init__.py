"""HTTP surface: the app factory, one router per API, and the one error mapping."""
