# An independent client: Python's grpcio with stubs generated from guest.proto by
# grpc_tools.protoc. Prints one line per check; the Rust test compares them.
import sys

import grpc

import guest_pb2 as pb
import guest_pb2_grpc as rpc

sock, work = sys.argv[1], sys.argv[2]
stub = rpc.GuestServiceStub(grpc.insecure_channel("unix:" + sock))


def exec_requests():
    yield pb.ExecRequest(start=pb.ExecStart(
        command=["sh", "-c", "echo hi; echo err >&2; exit 3"]))


out, err, code = b"", b"", None
for r in stub.Exec(exec_requests()):
    kind = r.WhichOneof("response")
    if kind == "stdout":
        out += r.stdout
    elif kind == "stderr":
        err += r.stderr
    else:
        code = r.exit_code
print("exec", out.decode().strip(), err.decode().strip(), code)

s = stub.StatPath(pb.StatPathRequest(path=work + "/data.txt"))
print("stat", s.exists, s.is_file, s.size)

data = b""
for r in stub.CopyFromGuest(pb.CopyFromGuestRequest(path=work + "/data.txt")):
    kind = r.WhichOneof("response")
    if kind == "header":
        print("header", r.header.path, r.header.size)
    elif kind == "data":
        data += r.data
    elif kind == "end":
        print("end", getattr(r.end, "final"))
print("data", data.decode().strip())


def copy_requests():
    yield pb.CopyToGuestRequest(start=pb.CopyToGuestStart(
        path=work + "/up.txt", mode=0o600, size=5))
    yield pb.CopyToGuestRequest(data=b"hello")
    yield pb.CopyToGuestRequest(end=pb.CopyToGuestEnd())


r = stub.CopyToGuest(copy_requests())
print("copy", r.success, r.bytes_written)
