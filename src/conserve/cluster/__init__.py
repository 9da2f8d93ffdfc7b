"""conserve on several engine replicas: Ray Serve deployments behind one OpenAI-compatible ingress."""
