# MLflow tracking server with the Postgres driver and the S3 client for MinIO/S3 artifacts.
FROM python:3.11.11-slim-bookworm

RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5 \
    && useradd --create-home --uid 1000 mlflow
USER 1000
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
