# medcli on CPU: docker build -t medcli . && docker run --rm -v medcli-data:/data medcli download bloodmnist --sample
# && docker run --rm -v medcli-data:/data -v medcli-runs:/work/runs medcli train --reduced --root /data/sample
FROM python:3.11-slim

ENV PYTHONHASHSEED=0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    MEDCLI_DATA=/data \
    MPLBACKEND=Agg

# CPU build of torch: a few hundred MB instead of several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.14.1" "torchvision==0.29.1"

WORKDIR /opt/medcli
COPY pyproject.toml README.md ./
COPY medcli ./medcli
RUN pip install . && useradd --create-home --uid 1000 medcli \
    && mkdir -p /data /work/runs && chown -R medcli:medcli /data /work

USER medcli
WORKDIR /work
VOLUME ["/data"]
ENTRYPOINT ["medcli"]
CMD ["--help"]
