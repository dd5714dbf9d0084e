package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// committed is the generated file as the repository holds it.
const committed = "../../limits_gen.go"

// TestCommittedFileIsCurrent fails when limits_gen.go is not what the
// committed objects' BTF generates: someone changed steer.h, rebuilt the
// objects and did not regenerate, or edited the generated file. Both
// byte orders must give the same constants.
func TestCommittedFileIsCurrent(t *testing.T) {
	want, err := os.ReadFile(committed)
	if err != nil {
		t.Fatal(err)
	}
	for _, obj := range []string{"../../../bpf/steer_bpfel.o", "../../../bpf/steer_bpfeb.o"} {
		got, err := generateFromObject(obj)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from what %s generates (run make generate and commit):\n%s", committed, obj, got)
		}
	}
}

// specWith returns a BTF spec holding the given types, as an object file's
// would.
func specWith(t *testing.T, types ...btf.Type) *btf.Spec {
	t.Helper()
	b, err := btf.NewBuilder(types, nil)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b.Marshal(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

// objectEnums returns the enums as the committed object has them, for the
// cases below to alter.
func objectEnums(t *testing.T) map[string]*btf.Enum {
	t.Helper()
	spec, err := btf.LoadSpec("../../../bpf/steer_bpfel.o")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*btf.Enum{}
	for _, e := range enums {
		var typ *btf.Enum
		if err := spec.TypeByName(e.c, &typ); err != nil {
			t.Fatal(err)
		}
		out[e.c] = btf.Copy(typ).(*btf.Enum)
	}
	return out
}

func TestGenerateRefusesUnmappedEnums(t *testing.T) {
	for _, tc := range []struct {
		name  string
		alter func(map[string]*btf.Enum)
		want  string
	}{
		{"as committed", func(map[string]*btf.Enum) {}, ""},
		{"new member", func(m map[string]*btf.Enum) {
			e := m["steer_counters"]
			e.Values = append(e.Values, btf.EnumValue{Name: "STEER_CNT_NEWKIND", Value: 8})
		}, "STEER_CNT_NEWKIND has no Go name"},
		{"member removed", func(m map[string]*btf.Enum) {
			e := m["steer_limits"]
			e.Values = e.Values[1:]
		}, "STEER_SLOTS is not in the object"},
		{"enum missing", func(m map[string]*btf.Enum) { delete(m, "steer_modes") }, "enum steer_modes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := objectEnums(t)
			tc.alter(m)
			var types []btf.Type
			for _, e := range m {
				types = append(types, e)
			}
			out, err := generate(specWith(t, types...))
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				want, err := os.ReadFile(committed)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(out, want) {
					t.Errorf("BTF rebuilt from the object's enums generates another file:\n%s", out)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("generate() error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestValuesFollowTheObject changes a value in the BTF and checks that the
// output follows, so the constants come from the object and nowhere else.
func TestValuesFollowTheObject(t *testing.T) {
	m := objectEnums(t)
	for i, v := range m["steer_limits"].Values {
		if v.Name == "STEER_MAX_WORKERS" {
			m["steer_limits"].Values[i].Value = 12
		}
	}
	out, err := generate(specWith(t, m["steer_limits"], m["steer_modes"], m["steer_counters"]))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte("MaxWorkers = 12 // STEER_MAX_WORKERS")) {
		t.Errorf("generated file does not follow the BTF's STEER_MAX_WORKERS = 12:\n%s", out)
	}
}
