package control

import (
	"encoding/json"
	"strings"
	"testing"
)

func FuzzDecodeRequest(f *testing.F) {
	for _, seed := range []string{
		`{"v":1,"op":"restart"}`,
		`{"v":1,"op":"restart","wait":true}` + "\n",
		`{"v":1,"op":"status"}` + "\r\n",
		`{"v":1,"op":"status","wait":true}`,
		`{"op":"status"}`,
		`{"v":2,"op":"status"}`,
		`{"v":1,"op":"reboot"}`,
		`{"v":1,"op":"restart","extra":1}`,
		`{"v":1,"op":"restart"}{"v":1,"op":"status"}`,
		`{"V":1,"OP":"restart"}`,
		`{"v":1,"v":2,"op":"restart"}`,
		`{"v":1.0,"op":"restart"}`,
		`{"v":"1","op":"restart"}`,
		`null`,
		`[]`,
		`"restart"`,
		``,
		"\n",
		`{"v":1,"op":"rest\u0061rt"}`,
		"{\"v\":1,\"op\":\"restart\xff\"}",
		`{"v":1,"op":"restart","wait":null}`,
		strings.Repeat(" ", MaxRequestSize+1),
		`{"v":1,"op":"upgrade","wait":true}`,
		`{"v":1,"op":"promote"}`,
		`{"v":1,"op":"rollback","wait":true}`,
		`{"v":1,"op":"restart","canary_permille":100}`,
		`{"v":1,"op":"restart","canary_permille":1000}`,
		`{"v":1,"op":"promote","canary_permille":5}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := DecodeRequest(line)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("error without a message: a bad_request must say what was wrong")
			}
			return
		}
		if len(line) > MaxRequestSize+2 {
			t.Fatalf("accepted a %d-byte request", len(line))
		}
		if req.V != ProtocolVersion {
			t.Fatalf("accepted version %d", req.V)
		}
		switch req.Op {
		case OpRestart, OpStatus, OpUpgrade, OpPromote, OpRollback:
		default:
			t.Fatalf("accepted op %q", req.Op)
		}
		if req.CanaryPermille != 0 && (req.Op != OpRestart || req.CanaryPermille < MinCanaryPermille || req.CanaryPermille > MaxCanaryPermille) {
			t.Fatalf("accepted canary_permille %d on op %q", req.CanaryPermille, req.Op)
		}
		if req.Op == OpStatus && req.Wait {
			t.Fatal("accepted wait on a status request")
		}
		// What we accept, we must be able to say back in canonical form.
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", req, err)
		}
		again, err := DecodeRequest(append(b, '\n'))
		if err != nil {
			t.Fatalf("re-encoded request %s rejected: %v", b, err)
		}
		if again != req {
			t.Fatalf("round trip changed %+v to %+v", req, again)
		}
	})
}
