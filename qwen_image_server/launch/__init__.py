"""Running the server as processes: uvicorn and Gunicorn (`http`), Ray Serve (`ray_app`, `ray_router`)."""
