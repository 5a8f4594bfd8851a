# The MLflow server of the team stack: PostgreSQL store (psycopg2), artifacts proxied to S3 (boto3), basic auth
# (Flask-WTF). Versions are requirements/lock.txt's pins (tests/test_infra.py checks them).
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 Flask-WTF==1.3.0 psycopg2-binary==2.9.13 boto3==1.43.117
EXPOSE 5000
ENTRYPOINT ["mlflow"]
