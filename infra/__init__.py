"""What runs the pipeline's services: infra/local starts them natively; compose/ and k8s/ deploy them."""
